"""The processes below this one, found through /proc, and how to make them leave (Linux).

Ray (simulation) and Flower (deployment) start their helpers in sessions of their own and
let them outlive their parents: Ray's workers are still exiting after `ray.shutdown()`
returns, and a SuperExec can outlive its SuperNode. A command that started them must wait
for them, and stop what does not leave, before it returns. Processes are named by
(pid, start time): a pid that the kernel reused for somebody else's process is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # linux/prctl.h


class Proc(NamedTuple):
    pid: int
    started: int  # clock ticks after boot (/proc/PID/stat field 22): with the pid, one process for good


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1], start time [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def identify(pid: int) -> Proc | None:
    fields = _stat(pid)
    return Proc(pid, int(fields[19])) if fields else None


def alive(proc: Proc) -> bool:
    """Still this process (not a reused pid), and not a zombie."""
    fields = _stat(proc.pid)
    return fields is not None and int(fields[19]) == proc.started and fields[0] != "Z"


def descendants(pid: int) -> list[Proc]:
    """Every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            if (proc := identify(kid)) is not None:
                found.append(proc)
            todo.append(kid)
    return found


def send(proc: Proc, sig: int) -> None:
    """Signal `proc` if it is still the process it was."""
    if alive(proc):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, sig)


def reap(procs: Iterable[Proc]) -> None:
    """Collect those of `procs` that exited as our children (orphans re-parented to a subreaper are
    ours), so that no zombie is left; other children's exit statuses stay for their owners."""
    for proc in procs:
        fields = _stat(proc.pid)
        if fields is not None and fields[0] == "Z" and int(fields[19]) == proc.started:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)


def wait_gone(procs: Iterable[Proc], timeout: float) -> list[Proc]:
    """Wait up to `timeout` s for `procs` to exit on their own; return those still alive."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        reap(procs)
        left = [p for p in procs if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def end(procs: Iterable[Proc], grace: float = 5.0) -> list[Proc]:
    """SIGTERM, then SIGKILL whatever is left after `grace` s; return what had to be killed."""
    procs = [p for p in procs if alive(p)]
    for proc in procs:
        send(proc, signal.SIGTERM)
    killed = wait_gone(procs, grace)
    for proc in killed:
        send(proc, signal.SIGKILL)
    wait_gone(killed, 5.0)
    return killed


def become_subreaper(on: bool = True) -> bool:
    """Have orphaned descendants re-parented to this process instead of init, so that they are still
    found below it; return the previous setting (Linux; elsewhere a no-op that returns False)."""
    previous = ctypes.c_int(0)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(previous.value)


@contextlib.contextmanager
def contained(what: str, settle: float = 30.0, grace: float = 5.0) -> Iterator[None]:
    """Every process started below this one inside the block has left when the block does, also on
    Ctrl-C: first up to `settle` s to exit by itself (Ray's workers after shutdown), then stopped."""
    previous = become_subreaper()
    before = set(descendants(os.getpid()))
    try:
        yield
    finally:
        started = [p for p in descendants(os.getpid()) if p not in before]
        left = wait_gone(started, settle)
        if left:
            killed = end(left, grace)
            log.warning("%s: %d process(es) still running %gs after it ended were stopped%s", what, len(left),
                        settle, f" ({len(killed)} killed)" if killed else "")
        become_subreaper(previous)
