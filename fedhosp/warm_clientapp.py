"""A warm `flwr-clientapp`: libraries imported once per hospital, a fresh forked process per task.

Flower's SuperNode starts a new `flwr-clientapp` process for every message, and that
process spends ~11 s importing torch, Opacus, torchmetrics and Flower before it trains
(twice a round: train and evaluate). `fedhosp client` instead starts one *zygote* that
imports those libraries once and then waits on a UNIX socket in the site's state
folder, and puts a tiny `flwr-clientapp` shim first on the SuperNode's PATH. For each
task the shim asks the zygote to fork; the child takes the shim's argv, environment and
working directory and runs Flower's own `flwr-clientapp` entry point, exactly as the
stock command would, and the shim exits with the child's status.

What a task runs is the site's decision, not the bundle's: our own packages are dropped
from the zygote before it forks, and each child starts behind fedhosp/approved_code.py's
guard, which imports the ClientApp from the hospital's own installation when the bundle
the SuperNode installed holds the same site-side code (or from the bundle, only if the
hospital approved its digest), and refuses it otherwise; only third-party modules from
the site's own environment are shared. Each child is a new process (nothing it does
reaches the zygote or the next task), its numpy and torch global generators are
reseeded from the OS like a fresh interpreter's, and the zygote never touches CUDA
(a CUDA context cannot cross a fork). When the zygote is not there (not yet imported,
gone, or not started: `--stock`), the shim runs Flower's `flwr-clientapp` behind the same guard
(`python -m fedhosp.approved_code`): never slower than Flower, never unguarded.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from common.flower_compat import clientapp as flower_clientapp
from common.flower_compat import waits as flower_waits
from fedhosp import approved_code

OURS = frozenset({"client", "common", "server", "simulation", "fedhosp", "bench", "tests"})
# What a task imports: Flower's entry point, our app (torch, Opacus, pydicom), the metrics' libraries.
PRELOAD = (flower_clientapp.MODULE, "client.app", "sklearn.metrics",
           "torchmetrics.functional.classification",
           "torchmetrics.functional.segmentation")
ENTRY = flower_clientapp.ENTRY
SOCKET_NAME = "clientapp.sock"
SHIM_NAME = flower_clientapp.COMMAND

# The shim runs with `python -IS` (no site-packages, no environment): stdlib only, ~20 ms.
SHIM = '''\
#!{python} -IS
"""flwr-clientapp through fedhosp's warm zygote ({socket}); {fallback[0]} ... if it is not there."""
import json, os, signal, socket, sys
FALLBACK, PATH = {fallback!r}, {socket!r}
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(PATH)
except (OSError, TypeError):  # TypeError: no zygote at all (PATH None)
    os.execv(FALLBACK[0], [*FALLBACK, *sys.argv[1:]])
request = {{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}
conn.sendall(json.dumps(request).encode() + b"\\n")
reader = conn.makefile("r")
reply = json.loads(reader.readline() or "{{}}")
if "pid" not in reply:
    sys.exit(reply.get("error", "fedhosp's clientapp zygote did not start the task"))
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, _f, pid=reply["pid"]: os.kill(pid, s))
line = reader.readline()
code = json.loads(line)["exit"] if line else 1
sys.exit(128 - code if code < 0 else code)  # killed by signal N: 128 + N, as a shell reports it
'''


def guarded(guard: Sequence[str]) -> list[str]:
    """Flower's clientapp behind the site's approved-code guard, without a zygote (the shim appends
    Flower's arguments)."""
    return [sys.executable, "-m", approved_code.__name__, *guard, "--"]


def write_shim(bin_dir: Path, socket_path: Path | None, fallback: Sequence[str]) -> Path:
    """The `flwr-clientapp` to put first on the SuperNode's PATH: a task goes to the zygote at
    `socket_path`, or (none, or not answering) runs `fallback` + Flower's arguments."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / SHIM_NAME
    shim.write_text(SHIM.format(python=sys.executable, fallback=list(fallback),
                                socket=None if socket_path is None else str(socket_path)))
    shim.chmod(0o755)
    return shim


def command(socket_path: Path, guard: Sequence[str]) -> list[str]:
    """The zygote's own command line, run by `fedhosp client` beside the SuperNode (`guard`: the
    approved-code guard's settings, approved_code.arguments)."""
    return [sys.executable, "-m", "fedhosp.warm_clientapp", str(socket_path), *guard]


def preload(modules: Iterable[str] = PRELOAD) -> None:
    """Import the libraries every task needs, then forget our own modules (each task imports
    them again from the app bundle it was sent)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a task would fail the same way; it will say so itself, in its own process
            print(f"fedhosp: could not preload {name} ({exc}); tasks import it themselves", file=sys.stderr)
    for name in [m for m in sys.modules if m.split(".")[0] in OURS]:
        del sys.modules[name]


def serve(socket_path: Path, entry: str = ENTRY, guard: Callable[[], object] | None = None) -> None:
    """Fork one child per request until SIGTERM; tell each requester its child's pid, then its status."""
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path) + ".new")  # bound, then renamed: a shim never meets a half-ready socket
    os.chmod(str(socket_path) + ".new", 0o600)
    listener.listen(16)
    os.replace(str(socket_path) + ".new", socket_path)
    waiting: dict[int, socket.socket] = {}  # child pid -> the shim that asked for it
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            with contextlib.suppress(InterruptedError):
                ready, _, _ = select.select([listener], [], [], 0.1)
                if ready:
                    conn, _ = listener.accept()
                    _start(conn, listener, waiting, entry, guard)
            _reap(waiting)
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)
        for pid in waiting:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _start(conn: socket.socket, listener: socket.socket, waiting: dict[int, socket.socket], entry: str,
           guard: Callable[[], object] | None) -> None:
    conn.settimeout(10)
    try:
        request = json.loads(conn.makefile("r").readline())
        argv, env, cwd = list(request["argv"]), dict(request["env"]), str(request["cwd"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": f"bad request to the clientapp zygote: {exc}"}).encode() + b"\n")
        conn.close()
        return
    pid = os.fork()
    if pid == 0:  # the child never returns into the zygote's loop, whatever happens
        code = 1
        try:
            listener.close()
            for other in waiting.values():
                other.close()
            conn.close()
            code = _run_task(entry, argv, env, cwd, guard)
        finally:
            os._exit(code)
    waiting[pid] = conn
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            conn.close()


def _run_task(entry: str, argv: Sequence[str], env: dict[str, str], cwd: str,
              guard: Callable[[], object] | None = None) -> int:
    """In the forked child: become the process the stock command would have been, behind the site's
    guard (installed by this, the site's code, before Flower reads the bundle), run it, exit."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [SHIM_NAME, *argv]
    _reseed()
    module_name, _, attr = entry.partition(":")
    code = 0
    try:
        if guard is not None:
            guard()
        result = getattr(importlib.import_module(module_name), attr)()
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:  # a task's crash is the task's, as in a process of its own
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            import atexit

            atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _reseed() -> None:
    """Fresh global generators, as a new interpreter would have (`random` reseeds itself on fork)."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        raise SystemExit("usage: python -m fedhosp.warm_clientapp SOCKET_PATH --flower-home DIR --state DIR "
                         "[--allow-app SHA256 ...]")
    settings = approved_code.parser().parse_args(args[1:])
    preload()
    flower_waits.shorten_object_pulls()  # inherited by every child: it asks for objects still arriving
    print(f"fedhosp: clientapp libraries loaded; warm tasks through {args[0]}", flush=True)
    serve(Path(args[0]), guard=lambda: approved_code.install_from(settings))


if __name__ == "__main__":
    main()
