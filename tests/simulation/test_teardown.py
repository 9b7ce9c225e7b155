"""`fedhosp simulate` leaves no Ray process behind: when it ends, and when it is interrupted with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from common import process_tree
from tests import leftovers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _marked_env() -> tuple[dict[str, str], str]:
    marker = f"teardown-{uuid.uuid4().hex}"
    return {**os.environ, leftovers.MARKER: marker}, marker


def test_ctrl_c_during_a_round_leaves_no_ray_process(tmp_path):
    env, marker = _marked_env()
    cmd = [sys.executable, "-m", "fedhosp", "simulate", "--sites", "2", "--rounds", "50", "--no-dp",
           "--images-per-site", "40", "--out", str(tmp_path), "--run-config", "local-epochs=1 batch-size=8"]
    log = tmp_path / "simulate.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "round 1/50" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert "round 1/50" in log.read_text(), log.read_text()[-2000:]
        workers = [c for c in map(leftovers.command, leftovers.marked(marker)) if "ray::" in c]
        assert workers  # Ray is running the sites right now
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
        assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]
        assert "interrupted" in log.read_text()
        assert not leftovers.ray_or_flower(marker)  # the moment the command has returned
    finally:
        process_tree.end(leftovers.marked(marker))


def test_contained_waits_for_an_orphan_and_stops_one_that_would_not_leave():
    """A grandchild whose parent exits becomes an orphan (Ray's workers after shutdown): still waited for."""
    marker = f"orphan-{uuid.uuid4().hex}"
    script = ("import os, signal, sys, time\n"
              "if os.fork() == 0:\n"
              "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "    time.sleep(float(sys.argv[1]))\n"
              "    os._exit(0)\n")
    env = {**os.environ, leftovers.MARKER: marker}
    started = time.monotonic()
    with process_tree.contained("test", settle=1.0, grace=0.5):
        subprocess.run([sys.executable, "-c", script, "0.3"], env=env, check=True)  # leaves by itself
    assert time.monotonic() - started >= 0.3 and not leftovers.marked(marker)
    with process_tree.contained("test", settle=0.5, grace=0.5):
        subprocess.run([sys.executable, "-c", script, "600"], env=env, check=True)  # ignores SIGTERM
    assert not leftovers.marked(marker)
