"""What `fedhosp server` / `fedhosp client` hand the Flower processes they start, and whom they stop."""

import signal
import subprocess
import sys

from common import flower_env, process_tree
from common.process_tree import Proc
from fedhosp import processes


def test_flower_processes_never_inherit_flowers_internal_toggles(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")  # would open a legacy Control API on 0.0.0.0
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    monkeypatch.setenv("FEDHOSP_KEEP_ME", "yes")
    env = flower_env.command_env(tmp_path, {"FLWR_INTERNAL_ANYTHING": "1", "EXTRA": "x"})
    assert not [k for k in env if k.startswith("FLWR_INTERNAL_")]
    assert env["FEDHOSP_KEEP_ME"] == "yes" and env["EXTRA"] == "x" and env["FLWR_HOME"] == str(tmp_path)
    processes.show_env(env)  # the transcript says so
    unset = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("$ unset "))
    assert {"FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"} <= set(unset.split()[2:])


def test_a_started_flower_process_sees_no_internal_toggle(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    probe = "import os, sys; sys.exit(any(k.startswith('FLWR_INTERNAL_') for k in os.environ))"
    child = processes.start("probe", [sys.executable, "-c", probe], tmp_path / "probe.log",
                            flower_env.command_env(tmp_path))
    assert child.popen.wait(timeout=30) == 0


def test_stop_leaves_alone_a_reused_pid_it_saw_before(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        seen = process_tree.identify(bystander.pid)
        assert seen is not None
        child = processes.start("short", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "c.log",
                                flower_env.command_env(tmp_path))
        child.known.add(Proc(seen.pid, seen.started - 1))  # a descendant seen once, whose pid is now the bystander's
        processes.stop(child, grace=5)
        assert not child.alive()
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()
