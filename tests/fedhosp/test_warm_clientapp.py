"""The warm clientapp zygote: a forked task is the process the stock command would have been."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedhosp import approved_code, warm_clientapp
from tests.fedhosp import test_approved_code

ROOT = Path(__file__).resolve().parents[2]
ZYGOTE = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
          "from fedhosp import warm_clientapp as w; w.preload(['numpy', 'fedhosp.warm_clientapp']); "
          "w.serve(Path(sys.argv[1]), entry='tests.fedhosp.warm_task:main')")


@pytest.fixture
def zygote(tmp_path):
    sock = Path(f"/tmp/fedhosp-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(sock)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the zygote did not start"
        time.sleep(0.05)
    shim = warm_clientapp.write_shim(tmp_path / "bin", sock, ["/bin/false"])
    yield proc, shim, sock
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert not sock.exists()  # the zygote removes its socket on the way out


def run_shim(shim, tmp_path, *args, **kwargs):
    env = {**os.environ, "WARM_OUT": str(tmp_path / "tasks.jsonl"), "WARM_MARK": "site-env"}
    (tmp_path / "cwd").mkdir(exist_ok=True)
    return subprocess.Popen([str(shim), *args], env=env, cwd=tmp_path / "cwd", **kwargs)


def reports(tmp_path):
    return [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]


def test_each_task_is_a_fresh_fork_with_the_shims_argv_env_cwd_and_exit_status(zygote, tmp_path):
    proc, shim, _ = zygote
    codes = [run_shim(shim, tmp_path, "--token", "abc", "--exit", str(code)).wait(timeout=60) for code in (0, 3)]
    assert codes == [0, 3]
    first, second = reports(tmp_path)
    assert first["argv"] == ["--token", "abc", "--exit", "0"] and first["env"] == "site-env"
    assert first["cwd"] == str(tmp_path / "cwd")
    assert first["numpy_preloaded"]  # the library came from the zygote...
    assert not first["zygote_module_loaded"]  # ...our own modules did not: a task imports them itself
    assert len({first["pid"], second["pid"], proc.pid}) == 3
    assert first["draw"] != second["draw"]  # numpy's global generator reseeded, as in a new interpreter


def test_a_signal_to_the_shim_reaches_the_task(zygote, tmp_path):
    _, shim, _ = zygote
    task = run_shim(shim, tmp_path, "--sleep", "60")
    while not (tmp_path / "tasks.jsonl").exists():
        time.sleep(0.05)
    task.send_signal(signal.SIGTERM)
    assert task.wait(timeout=30) == 128 + signal.SIGTERM


@pytest.mark.parametrize("socket_name", ["nobody.sock", None])
def test_without_a_zygote_the_shim_runs_its_fallback(tmp_path, socket_name):
    stock = tmp_path / "stock"
    stock.write_text("#!/bin/sh\necho stock \"$@\"\nexit 7\n")
    stock.chmod(0o755)
    sock = None if socket_name is None else tmp_path / socket_name  # a zygote gone, or none started
    shim = warm_clientapp.write_shim(tmp_path / "bin", sock, [str(stock), "--guarded"])
    task = run_shim(shim, tmp_path, "--token", "abc", stdout=subprocess.PIPE, text=True)
    out, _ = task.communicate(timeout=30)
    assert (task.returncode, out.strip()) == (7, "stock --guarded --token abc")


def test_the_fallback_is_flowers_clientapp_behind_the_sites_guard(tmp_path):
    guard = approved_code.arguments(tmp_path / "home", tmp_path / "state", ["ab" * 32])
    command = warm_clientapp.guarded(guard)
    assert command[:3] == [sys.executable, "-m", "fedhosp.approved_code"] and command[-1] == "--"
    settings = approved_code.parser().parse_args(command[3:-1])
    assert (settings.flower_home, settings.state, settings.allow_app) == (tmp_path / "home", tmp_path / "state",
                                                                          ["ab" * 32])


def test_a_forked_task_runs_behind_the_zygotes_guard(tmp_path):
    """The guard comes from the zygote's own command line (the site's), not from the task's request."""
    folder = test_approved_code.project(tmp_path, "changed")
    test_approved_code.tamper(folder)
    fab = test_approved_code.build(folder)
    sock = Path(f"/tmp/fedhosp-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    guard = approved_code.arguments(tmp_path / "home", tmp_path / "state", [])
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            "from fedhosp import approved_code as a, warm_clientapp as w; s = a.parser().parse_args(sys.argv[2:]); "
            "w.preload(['numpy']); "
            "w.serve(Path(sys.argv[1]), entry='tests.fedhosp.bundle_task:main', guard=lambda: a.install_from(s))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(sock), *guard], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)  # a forked task writes where the zygote does
    try:
        while not sock.exists():
            assert proc.poll() is None, "the zygote did not start"
            time.sleep(0.05)
        shim = warm_clientapp.write_shim(tmp_path / "bin", sock, ["/bin/false"])
        env = {**os.environ, "FLWR_HOME": str(tmp_path / "home")}
        assert subprocess.run([str(shim), str(fab), "--no-guard"], env=env, cwd=ROOT, timeout=120).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    result = json.loads(out.strip().splitlines()[-1])
    assert "refused app bundle" in result["error"] and "client/site.py changed" in result["error"]


def test_a_task_that_cannot_start_fails_alone_and_the_zygote_serves_the_next(zygote, tmp_path):
    proc, shim, sock = zygote
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(sock))
        conn.sendall(json.dumps({"argv": [], "env": dict(os.environ), "cwd": str(tmp_path / "no such")}).encode()
                     + b"\n")
        reader = conn.makefile("r")
        child = json.loads(reader.readline())["pid"]
        assert json.loads(reader.readline())["exit"] == 1  # the child could not chdir: it exited, not the zygote
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert run_shim(shim, tmp_path, "--exit", "5").wait(timeout=60) == 5
    assert proc.poll() is None
