"""Ctrl-C ends a command that runs an engine, whatever the libraries in its threads do with SIGINT.

Python turns SIGINT into KeyboardInterrupt in the main thread, and that is not enough here: Ray
defers SIGINT in the main thread around its own calls (`ray._private.utils.DeferSigint`, which
drops a deferred signal when an exception is on its way out), and Flower's simulation keeps
non-daemon threads that would hold the interpreter after the main thread has left. A suite run
saw one Ctrl-C pass unnoticed and the simulation run to its last round. So inside `ctrl_c_ends`
SIGINT is blocked in every thread, and one watcher thread takes it with `sigtimedwait`: it stops
every process below this one and exits with status 130, as a shell expects after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from common import process_tree

EXIT_STATUS = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C
POLL_S = 0.2


@contextlib.contextmanager
def ctrl_c_ends(what: str, grace: float = 5.0) -> Iterator[None]:
    """SIGINT inside this block stops every process below this one (`grace` s, then SIGKILL) and exits 130.

    Enter it in the main thread before any thread it should cover is started (threads keep the
    signal mask they were created with). Elsewhere, or without POSIX signal masks, a no-op."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(what, done, grace), name="ctrl-c", daemon=True)
    watcher.start()  # created with SIGINT blocked, as sigtimedwait needs
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a SIGINT still pending arrives now, as usual


def _watch(what: str, done: threading.Event, grace: float) -> None:
    while signal.sigtimedwait({signal.SIGINT}, POLL_S) is None:
        if done.is_set():
            return
    print(f"interrupted: stopping {what}", file=sys.stderr, flush=True)
    logging.disable(logging.CRITICAL)  # the engine's threads lose their workers now: no tracebacks for that
    process_tree.end(process_tree.descendants(os.getpid()), grace)
    exit_now()


def exit_now(status: int = EXIT_STATUS) -> None:
    """Leave with `status` at once, logs and output flushed: neither another thread still inside a
    library nor a non-daemon one that would never finish may keep the command alive."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
