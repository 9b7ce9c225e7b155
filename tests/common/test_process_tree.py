"""Processes are named by (pid, start time): a pid the kernel handed to somebody else is never signalled."""

import os
import signal
import subprocess
import sys

from common import process_tree
from common.process_tree import Proc


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_reused_pid_with_another_start_time_is_not_signalled():
    child = _sleeper()
    try:
        real = process_tree.identify(child.pid)
        assert real is not None and process_tree.alive(real)
        impostor = Proc(real.pid, real.started - 1)  # what we saw before the pid was reused
        assert not process_tree.alive(impostor)
        process_tree.send(impostor, signal.SIGTERM)
        assert child.poll() is None  # the process now holding that pid was left alone
        process_tree.send(real, signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


def test_end_signals_only_the_processes_it_was_given_that_are_still_them(monkeypatch):
    me = process_tree.identify(os.getpid())
    assert me is not None
    sent = []
    monkeypatch.setattr(process_tree.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    assert process_tree.end([Proc(me.pid, me.started + 7)], grace=0.1) == []
    assert sent == []
