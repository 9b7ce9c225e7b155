"""Which Ray and Flower processes started by these tests are still alive.

Every process a test starts inherits the test session's environment, and with it a marker
(conftest.py sets FEDHOSP_TEST_SESSION); Ray's workers and Flower's SuperExec inherit it too,
whoever their parent is by now. So "ours" is "carries the marker", not "is below pytest".
"""

from __future__ import annotations

import os
from pathlib import Path

from common import process_tree
from common.process_tree import Proc

MARKER = "FEDHOSP_TEST_SESSION"
NAMES = ("ray::", "raylet", "gcs_server", "/ray/", "flower-", "flwr-", "flwr ", "bin/flwr", "-m fedhosp", "bin/fedhosp",
         "nginx")


def marked(value: str) -> list[Proc]:
    """Live processes (not zombies) whose environment holds `value`, this process excepted."""
    needle = value.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ and (proc := process_tree.identify(int(entry.name))) and process_tree.alive(proc):
            found.append(proc)
    return found


def command(proc: Proc) -> str:
    try:
        return Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def ray_or_flower(value: str) -> list[str]:
    """The command lines of marked Ray / Flower / fedhosp processes still alive."""
    return [cmd for cmd in map(command, marked(value)) if any(name in cmd for name in NAMES)]
