"""End to end on 127.0.0.1: `fedhosp server` and three `fedhosp client`s over TLS with authenticated sites.

One scenario, as a coordinator and three hospitals would live it: the server is stopped
(SIGTERM, as `docker stop` does) after round 1; `--resume` continues at round 2 while one
hospital's SuperNode is killed in the middle of round 2; the run still finishes round 3
with the other two. Every Flower process started on the way is gone at the end. Mutual TLS is
on throughout: each hospital reaches nginx through its site tunnel with its signed certificate, and
a SuperNode dialling the hospitals' address itself (with a registered key, but no certificate) is
turned away at the TLS handshake.
"""

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from common import flower_env, process_tree
from common.data.synthetic import write_hospitals
from fedhosp import certs, processes
from server import checkpoint, runlog
from tests import leftovers
from tests.fedhosp import provision

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SITES = ("hosp-a", "hosp-b", "hosp-c")
PHASE_TIMEOUT = 900  # seconds; a quiet 2-core machine needs about a tenth of it


def _fedhosp(args, log, env):
    return subprocess.Popen([sys.executable, "-m", "fedhosp.cli", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)


def _wait_for(path, text, proc=None, timeout=PHASE_TIMEOUT, count=1, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text(errors="replace").count(text) >= count:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {text!r}:\n{path.read_text()[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"no {text!r} within {timeout}s:\n{path.read_text()[-3000:]}")


@pytest.fixture
def deployment(tmp_path):
    marker = f"deployment-{uuid.uuid4().hex}"  # every process of this test carries it, whoever its parent
    env = {**os.environ, leftovers.MARKER: marker}
    certs.init(tmp_path / "certs", ["localhost"])
    (tmp_path / "pubs").mkdir()
    for name in SITES:
        keys = provision.site(name, tmp_path / name, tmp_path / "certs")
        (tmp_path / "pubs" / f"{name}.pub").write_bytes(keys.public.read_bytes())
    write_hospitals(tmp_path / "data", num_sites=3, seed=5, images_per_site=60)
    started: list[subprocess.Popen] = []
    yield tmp_path, env, started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    left = process_tree.wait_gone(leftovers.marked(marker), 30)
    names = [leftovers.command(p) for p in left]
    process_tree.end(left, grace=1.0)
    assert not left, f"Flower processes outlived the test: {names}"


# A SuperNode on its own (no tunnel, so no client certificate) with hosp-a's registered key, as Flower
# ships it: it must not get in. Run as a child subreaper (provision.CONTAIN) so that its SuperExec stops too.


def _refused_without_a_certificate(base, fleet, env):
    context = ssl.create_default_context(cafile=str(base / "certs" / "ca.crt"))
    with socket.create_connection(("127.0.0.1", fleet), timeout=20) as raw, \
            pytest.raises(ssl.SSLError, match=r"ALERT_CERTIFICATE_REQUIRED|ALERT_HANDSHAKE_FAILURE"), \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: localhost\r\n\r\n")
        tls.recv(1)
    cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{fleet}", "--root-certificates",
           str(base / "certs" / "ca.crt"), "--auth-supernode-private-key", str(base / "hosp-a" / "hosp-a.key"),
           "--max-retries", "1", "--port", str(processes.free_port())]
    done = subprocess.run([sys.executable, "-c", provision.CONTAIN, *cmd],
                          env=flower_env.command_env(base / "alone", env), capture_output=True, text=True, timeout=180)
    assert done.returncode != 0 and "Exit Code: 305" in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]


def test_three_hospitals_stop_resume_and_a_dropout(deployment):
    base, env, started = deployment
    fleet, control = processes.free_port(), processes.free_port()
    server_args = ["server", "--certs", str(base / "certs"), "--sites", str(base / "pubs"), "--rounds", "3",
                   "--out", str(base / "run"), "--listen", f"127.0.0.1:{fleet}", "--control-port", str(control),
                   "--site-wait", "300", "--round-timeout", "300",
                   "--run-config", "local-epochs=1 dp-target-epsilon=4.0"]
    t0 = time.monotonic()
    # Round 1 waits for all three hospitals; the resumed run goes on with two once hosp-c is gone.
    server = _fedhosp([*server_args, "--min-sites", "3"], base / "server-1.log", env)
    started.append(server)
    # While the run waits for its three hospitals: no certificate, no Flower (and no race with round 2)
    _wait_for(base / "server-1.log", "$ flwr run ", server)
    _refused_without_a_certificate(base, fleet, env)
    clients = {}
    for i, name in enumerate(SITES):
        clients[name] = _fedhosp(["client", "--server", f"127.0.0.1:{fleet}", "--ca", str(base / "certs" / "ca.crt"),
                                  "--key", str(base / name / f"{name}.key"), "--data",
                                  str(base / "data" / f"site-00{i}"), "--device", "cpu",
                                  "--runtime-port", str(processes.free_port())], base / f"{name}.log", env)
        started.append(clients[name])

    # phase 1: round 1, then the coordinator is stopped
    _wait_for(base / "server-1.log", "round 1/3 |", server)
    t1 = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=120) != 0
    first = checkpoint.load(base / "run" / checkpoint.LAST)
    assert first["round"] == 1
    log1 = (base / "server-1.log").read_text()
    for command in ("$ flower-superlink ", "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                    "$ flwr supernode register ", "$ flwr run ", "nginx -c "):
        assert command in log1, command
    for name in SITES:  # each SuperNode went through its site tunnel, with its certificate
        site_log = (base / f"{name}.log").read_text()
        assert " -m fedhosp.site_tunnel " in site_log and f"(client certificate {name}.crt)" in site_log
    access = (base / "run" / "coordinator" / "nginx-access.log").read_text().splitlines()
    assert access and {line.split('"')[1] for line in access} == {f"CN={n}" for n in SITES}  # none without one

    # phase 2: --resume; hosp-c's SuperNode dies in the middle of round 2 (the stopped run may already
    # have sent it round 2's train message: count only what arrives from the resumed run)
    seen = (base / "hosp-c.log").read_text().count("Receiving: train message")
    resumed = _fedhosp([*server_args, "--min-sites", "2", "--resume"], base / "server-2.log", env)
    started.append(resumed)
    _wait_for(base / "server-2.log", "resuming after round 1 of 3", resumed)
    # The resumed round 2 reached it: kill it within 50 ms, long before its clientapp (fork, FAB import, training)
    # can have replied.
    _wait_for(base / "hosp-c.log", "Receiving: train message", count=seen + 1, poll=0.05)
    supernode = [p for p in processes.descendants(clients["hosp-c"].pid) if b"flower-supernode" in
                 Path(f"/proc/{p}/cmdline").read_bytes()]
    assert supernode
    os.kill(supernode[0], signal.SIGKILL)
    assert resumed.wait(timeout=PHASE_TIMEOUT) == 0, (base / "server-2.log").read_text()[-3000:]
    t2 = time.monotonic()
    log2 = (base / "server-2.log").read_text()
    assert "resuming after round 1 of 3" in log2
    assert "round 2/3 |" in log2 and "round 3/3 |" in log2 and "round 1/3 |" not in log2
    assert clients["hosp-c"].wait(timeout=60) != 0  # its SuperNode is gone: the client says so and exits

    records = runlog.read(base / "run" / runlog.RUN_LOG)
    assert [r["round"] for r in records] == [1, 2, 3]
    stacks = [e["layers"] for e in runlog.events(base / "run" / runlog.RUN_LOG) if e["event"] == "grid"]
    assert stacks and all(s == ["WaitingGrid", "PromptGrid", "PackedGrid", "HttpGrid"] for s in stacks)  # as in-process
    assert records[0]["sites_ok"] == 3
    assert (records[1]["sites_ok"], records[1]["sites_failed"]) == (2, 1)  # hosp-c died in round 2: left out
    assert records[2]["sites_ok"] == 2
    epsilons = [r["train"]["epsilon-max"] for r in records]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 4.0 + 1e-6  # one run in the ledgers across the restart
    final = checkpoint.load(base / "run" / checkpoint.MODEL)
    assert final["round"] == 3

    # The stopped coordinator may have sent round 2 before it went: a site that trained it answers the
    # resumed run's round 2 with the same reply (client/replay.py), which the ε bound above confirms.
    for name, expected in (("hosp-a", ([[1], [2, 3]], [[1, 2], [2, 3]])), ("hosp-c", ([[1]], [[1, 2]]))):
        lines = [json.loads(x) for x in (base / name / "state" / "audit.jsonl").read_text().splitlines()]
        runs = {}
        for line in lines:
            if line["event"] == "train":
                runs.setdefault(line["run-id"], []).append(line["round"])
        assert any(list(runs.values())[:len(rounds)] == rounds for rounds in expected), runs
        verdicts = {line["app-decision"] for line in lines if line["event"] == "app"}
        assert verdicts == {"installed"}  # every task behind the site's guard, on the hospital's own code
    for name in SITES:  # patient-derived data at rest: nothing of a site's readable by another user
        state = base / name / "state"
        shared = [p for p in [state, *state.rglob("*")] if not p.is_symlink() and p.stat().st_mode & 0o077]
        assert not shared, [f"{p}: {stat.filemode(p.stat().st_mode)}" for p in shared]
    print(f"\nphase 1 (start + round 1): {t1 - t0:.0f}s; phase 2 (restart + rounds 2-3 with a dropout): "
          f"{t2 - t1:.0f}s")
