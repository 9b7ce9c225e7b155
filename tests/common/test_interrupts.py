"""Ctrl-C ends a command that runs an engine even when a library in it swallows SIGINT (Ray can)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common import process_tree

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import contextlib, signal, subprocess, sys, time
from common.interrupts import ctrl_c_ends
with ctrl_c_ends("the engine") if sys.argv[1] == "on" else contextlib.nullcontext():
    signal.signal(signal.SIGINT, lambda *_: None)  # a library that swallows Ctrl-C in the main thread
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # a process it started
    print(engine.pid, flush=True)
    time.sleep(4)
print("ran to the end", flush=True)
"""


@pytest.mark.parametrize("watcher", ["on", "off"])
def test_ctrl_c_stops_what_the_command_started_and_exits_130(watcher):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, watcher], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    engine = process_tree.identify(int(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    try:
        if watcher == "on":
            assert proc.returncode == 130 and "interrupted: stopping the engine" in err
            assert "ran to the end" not in out and not process_tree.alive(engine)
        else:  # what happens without it: the interrupt is lost
            assert proc.returncode == 0 and "ran to the end" in out
    finally:
        process_tree.end([engine], grace=1)
