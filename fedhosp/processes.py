"""Start and stop Flower's long-running processes (and nginx) for `fedhosp server` / `fedhosp client`.

Flower's SuperLink and SuperNode start children in sessions of their own (SuperExec,
then one `flwr-serverapp` / `flwr-clientapp` per task), so stopping a process group
is not enough: `stop` ends the whole tree, found through /proc (common/process_tree.py),
so that no Flower process outlives the command that started it. Only processes that are
still the ones seen (pid and start time) are signalled: a reused pid is somebody else's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import process_tree
from common.errors import FedhospError
from common.process_tree import Proc, become_subreaper

__all__ = ["become_subreaper"]  # re-exported for the commands that stop their strays


class StartError(FedhospError):
    """A Flower process or the proxy did not come up."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[Any]
    log: Path
    known: set[Proc] = field(default_factory=set)  # every descendant seen: orphans are re-parented away

    def alive(self) -> bool:
        return self.popen.poll() is None

    def refresh(self) -> None:
        self.known.update(process_tree.descendants(self.popen.pid))

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def show(cmd: Sequence[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)


def show_env(env: Mapping[str, str]) -> None:
    """Print what `env` sets, changes or drops against this process's own environment, as shell lines:
    followed by the commands `show` prints, the transcript is exactly what runs."""
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    dropped = sorted(k for k in os.environ if k not in env)
    if changed:
        print("$ export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())), flush=True)
    if dropped:
        print("$ unset " + " ".join(dropped), flush=True)


def start(name: str, cmd: Sequence[str], log: Path, env: Mapping[str, str]) -> Child:
    show(cmd)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=dict(env), start_new_session=True)
    return Child(name, popen, log)


def stop(child: Child, grace: float = 10.0) -> None:
    """SIGTERM the process and everything it started; SIGKILL whatever is left after `grace`."""
    child.refresh()
    root = process_tree.identify(child.popen.pid)
    tree = [*([root] if root else []), *sorted(child.known)]
    for proc in tree:
        process_tree.send(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(process_tree.alive(p) for p in tree):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=0.1)
        tree += [p for p in process_tree.descendants(child.popen.pid) if p not in tree]
    for proc in tree:
        process_tree.send(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.popen.wait(timeout=5)


def descendants(pid: int) -> list[int]:
    """The pids of every live process below `pid`."""
    return [p.pid for p in process_tree.descendants(pid)]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_tls(child: Child, host: str, port: int, ca: Path, timeout: float, *,
                 client_certificate_required: bool = False) -> None:
    """Until `host:port` completes a TLS handshake that `ca` verifies; fail early if `child` died.
    `client_certificate_required`: the server (nginx, mutual TLS) ends the handshake of a client without a
    certificate, as this one is; its refusal, which comes after its own certificate verified, counts as up."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise StartError(f"{child.name} exited with status {child.popen.returncode}; its log "
                             f"({child.log}) ends:\n{child.tail()}")
        try:
            with socket.create_connection((host, port), timeout=2) as raw, \
                    context.wrap_socket(raw, server_hostname=host) as tls:
                if client_certificate_required:
                    tls.sendall(b"\r\n")  # TLS 1.3: the refusal arrives with the first read
                    with contextlib.suppress(TimeoutError):  # nothing: it took us, and waits for a request
                        tls.recv(1)
                return
        except ssl.SSLError as exc:
            if client_certificate_required and not isinstance(exc, ssl.SSLCertVerificationError) and \
                    any(a in str(exc.reason) for a in ("ALERT_HANDSHAKE_FAILURE", "ALERT_CERTIFICATE_REQUIRED")):
                return
            if time.monotonic() > deadline:
                raise StartError(f"{child.name} did not complete a TLS handshake on {host}:{port} within "
                                 f"{timeout:g}s ({exc.reason}); see {child.log}") from None
            time.sleep(0.5)
        except OSError:
            if time.monotonic() > deadline:
                raise StartError(f"{child.name} did not answer on {host}:{port} within {timeout:g}s; "
                                 f"see {child.log}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def stopping_on_sigterm() -> Iterator[None]:
    """`docker stop` and process managers send SIGTERM: unwind (and stop children) as on Ctrl-C."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_strays(grace: float = 5.0) -> None:
    """Stop and reap every process still below this one: for a CLI command on its way out."""
    process_tree.end(process_tree.descendants(os.getpid()), grace)
