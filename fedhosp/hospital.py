"""`fedhosp client`: one hospital's SuperNode, with the site's settings as Flower node config.

The SuperNode dials the coordinator over TLS, trusting only the consortium CA, signs
every Fleet API call with the site's private key (SuperNode authentication) and runs
our ClientApp, which reads `data-path`, `state-dir`, `device` and `privacy-budget` from
the node config (common/config.py SiteConfig) and the site's policy, `--policy` (common/site_policy.py):
what protects this hospital's patients is set here, never by the coordinator. Runtime dependency installation stays
off: the ClientApp runs in this environment, nothing is downloaded at run time.
Before starting, a TLS handshake checks the CA and the server name, so a wrong CA or
a plaintext server is reported in one line instead of as endless reconnects.

The coordinator admits only TLS clients with a certificate from the consortium CA (mutual TLS,
`--cert`, signed with `fedhosp certs sign`), which Flower's SuperNode cannot present: the site's
tunnel (fedhosp/site_tunnel.py) holds the certificate, and the SuperNode dials the tunnel on
127.0.0.1 (trusting only a certificate made for this start) with its node-auth key as before.
The tunnel is started, printed and stopped like every other process of the site, and a
certificate the coordinator turns away is reported in one line, by the preflight or the tunnel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from common import flower_compat, flower_env
from common.config import DEVICES, to_toml
from common.errors import ConfigError, FedhospError
from common.flower_compat import waits as flower_waits
from common.flower_compat.cli_output import REFUSED_KEY
from common.site_policy import DEFAULT_PRIVACY_BUDGET, POLICY_KEYS, SitePolicy
from common.site_state import SiteState
from fedhosp import approved_code, certs, processes, site_tunnel, warm_clientapp

FLOWER_HOME, SUPERNODE_LOG = "flwr-home", "supernode.log"  # in the site's state folder (common/site_state.py)
UMASK = 0o077  # patient-derived data at rest (caches, ledger, replies, logs) readable by the site's user only


TUNNEL = "site tunnel"  # fedhosp/site_tunnel.py: the SuperNode's way out, with the site's client certificate
REFRESH_TICKS = 5  # the watch loop walks /proc for descendants every 5th 0.2 s tick (bench/load.py: per site cost)


class SiteRefused(FedhospError):
    """The coordinator did not accept this site: unknown key, TLS failure, or no connection."""


@dataclass(frozen=True)
class ClientOptions:
    server: str
    ca: Path
    key: Path
    data: Path
    state: Path | None = None  # default: a `state` folder beside the key, in the site's own folder
    device: str = "auto"
    privacy_budget: float = DEFAULT_PRIVACY_BUDGET
    policy: dict[str, Any] | None = None  # the site's policy keys (common/site_policy.py): `--policy`
    allow_apps: tuple[str, ...] = ()  # app bundle digests the hospital approved besides its installed code
    runtime_port: int = 9094  # the SuperNode's own Runtime API, on 127.0.0.1
    cert: Path | None = None  # the site's client certificate (default: NAME.crt beside the key)
    tunnel_port: int | None = None  # the site tunnel, on 127.0.0.1 (None: runtime_port + 1): the SuperNode's way out
    source_address: str | None = None  # the local address the tunnel dials the coordinator from (None: any)
    max_wait: float | None = None  # stop trying to reach the server after this many seconds (None: never)
    warm: bool = True  # tasks forked from a process that imported torch & co. once (fedhosp/warm_clientapp.py)
    short_waits: bool = True  # the SuperNode's fixed sleeps shortened (common/flower_compat/waits.py)
    dry_run: bool = False  # print what would run, start nothing

    @property
    def state_dir(self) -> Path:
        return (self.state or self.key.parent / "state").resolve()

    @property
    def certificate(self) -> Path:
        return self.cert or certs.site_certificate(self.key)

    @property
    def tunnel(self) -> int:
        """The tunnel's port: beside the Runtime API's unless set, so sites given distinct --runtime-port
        values on one host get distinct tunnels too."""
        return self.tunnel_port or self.runtime_port + 1


def node_config(opts: ClientOptions) -> str:
    """Flower's `--node-config` string (TOML values): what SiteConfig reads at the site."""
    values = {"data-path": json.dumps(str(opts.data.resolve())), "state-dir": json.dumps(str(opts.state_dir)),
              "device": json.dumps(opts.device), "privacy-budget": repr(float(opts.privacy_budget)),
              **{k: to_toml(v) for k, v in (opts.policy or {}).items()}}
    return " ".join(f"{k}={v}" for k, v in values.items())


def supernode_command(opts: ClientOptions, tunnel_cert: Path) -> list[str]:
    """The SuperNode dials the site tunnel (`tunnel_cert`: the certificate made for this start), which
    carries its calls to `opts.server` with the site's client certificate."""
    cmd = [
        "flower-supernode",
        "--superlink", f"{site_tunnel.LOOPBACK}:{opts.tunnel}",
        "--root-certificates", str(tunnel_cert.resolve()),
        "--auth-supernode-private-key", str(opts.key.resolve()),
        "--node-config", node_config(opts),
        "--host", "127.0.0.1", "--port", str(opts.runtime_port),
    ]
    if opts.max_wait is not None:
        cmd += ["--max-wait-time", f"{opts.max_wait:g}"]
    return cmd


def launch_command(opts: ClientOptions, cmd: list[str]) -> list[str]:
    """How `cmd` (Flower's `flower-supernode ...`) is started: behind flower_compat/waits.py unless --stock-waits
    or Flower's workarounds are off (`common.flower_compat.enabled()`)."""
    return flower_waits.supernode_command(cmd) if opts.short_waits and flower_compat.enabled() else cmd


def check(opts: ClientOptions) -> None:
    if opts.device not in DEVICES:
        raise ConfigError(f"--device {opts.device!r}: expected {' | '.join(DEVICES)}")
    if not opts.privacy_budget > 0:
        raise ConfigError(f"--privacy-budget must be > 0 (default {DEFAULT_PRIVACY_BUDGET:g}): a hospital's "
                          "total ε over every run on its data")
    check_policy(opts.policy or {})
    for digest in opts.allow_apps:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(f"--allow-app {digest!r}: expected the 64-hex SHA-256 a refusal printed")
    for flag, path in (("--ca", opts.ca), ("--key", opts.key)):
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if opts.key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"--key {opts.key} is readable by others: `chmod 600 {opts.key}` (it is the site's identity)")
    certs.check_site_certificate(opts.certificate, opts.key, opts.ca)
    if not opts.data.is_dir():
        raise ConfigError(f"--data {opts.data}: no such folder; pass the hospital's data folder")
    host, _, port = opts.server.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--server {opts.server!r} is not HOST:PORT")


def check_policy(policy: dict[str, Any]) -> SitePolicy:
    """The site's policy as the ClientApp will parse it: a typo or a value out of range stops here."""
    unknown = sorted(set(policy) - POLICY_KEYS)
    if unknown:
        raise ConfigError(f"--policy: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(POLICY_KEYS))}")
    return SitePolicy.from_mapping(policy)


def preflight_tls(opts: ClientOptions, timeout: float = 10.0) -> bool:
    """Handshake once with the CA and the site's certificate, and ask for nothing (a 404 from the proxy);
    True if the server answered, False if it is not up yet."""
    upstream = site_tunnel.Upstream.parse(opts.server)
    context = site_tunnel.client_context(opts.ca, opts.certificate, opts.key)
    try:
        return site_tunnel.probe(upstream, context, opts.certificate, timeout, opts.source_address)
    except site_tunnel.Refused as exc:
        raise SiteRefused(str(exc)) from None
    except ssl.SSLCertVerificationError as exc:
        raise SiteRefused(f"TLS: the server at {opts.server} is not trusted with --ca {opts.ca} "
                          f"({exc.verify_message}): ask the coordinator for the consortium's ca.crt and the "
                          "address its certificate names") from None
    except ssl.SSLError as exc:
        raise SiteRefused(f"TLS: no TLS handshake with {opts.server} ({exc.reason}): is it the coordinator's "
                          "hospital address (fedhosp server --listen)?") from None


def plan(opts: ClientOptions, home: Path, warm_dir: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The environment and the commands, in start order, that run this site: what `join` prints and runs.
    A `flwr-clientapp` shim in `warm_dir` comes first on the SuperNode's PATH: every task runs behind the
    site's approved-code guard (fedhosp/approved_code.py), forked from the zygote when there is one (a
    workaround: only while `common.flower_compat.enabled()`)."""
    env = flower_env.command_env(home.resolve())
    commands: dict[str, list[str]] = {}
    guard = approved_code.arguments(home.resolve(), opts.state_dir, opts.allow_apps)
    warm = opts.warm and flower_compat.enabled()
    socket_path = warm_dir / warm_clientapp.SOCKET_NAME if warm else None
    # Every task Flower starts is this shim: the zygote's fork, or Flower's clientapp behind the site's guard.
    warm_clientapp.write_shim(warm_dir, socket_path, warm_clientapp.guarded(guard))
    env["PATH"] = str(warm_dir) + os.pathsep + env["PATH"]
    if socket_path is not None:
        commands["clientapp zygote"] = warm_clientapp.command(socket_path, guard)
    loopback = site_tunnel.loopback_pair(warm_dir)  # this start's own: the SuperNode trusts it alone
    commands[TUNNEL] = site_tunnel.command(opts.tunnel, loopback, opts.server, opts.ca, opts.certificate,
                                           opts.key, opts.source_address)
    commands["SuperNode"] = launch_command(opts, supernode_command(opts, loopback[0]))
    return env, commands


def join(opts: ClientOptions, echo: TextIO = sys.stdout) -> None:
    """Run the SuperNode until it stops; raise SiteRefused with the reason if it was turned away.
    First print the environment and every command it starts, exactly (`--dry-run`: only that)."""
    check(opts)
    home = SiteState(opts.state_dir).path_for(FLOWER_HOME)  # only named: a dry run writes nothing
    if opts.dry_run:  # touches nothing of the site's
        with tempfile.TemporaryDirectory(prefix="fedhosp-warm-") as warm_dir:
            _show(*plan(opts, home, Path(warm_dir)))
        return
    with _private_files():
        _run(opts, home, echo)


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    """What this process writes is the site's user's only, whatever the shell's umask (its children get
    UMASK explicitly, as printed)."""
    saved = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(saved)


def _run(opts: ClientOptions, home: Path, echo: TextIO) -> None:
    if not preflight_tls(opts):
        print(f"{opts.server} does not answer yet; the SuperNode keeps trying", file=echo, flush=True)
    state = SiteState(opts.state_dir)
    state.subfolder(FLOWER_HOME).folder()  # the state folder and Flower's home in it: 0700
    log_path = state.path_for(SUPERNODE_LOG)
    lines: list[str] = []
    pumps: list[threading.Thread] = []
    with processes.stopping_on_sigterm(), state.open_append(SUPERNODE_LOG) as full, \
            tempfile.TemporaryDirectory(prefix="fedhosp-warm-") as warm_dir:  # 0700; a short UNIX socket path
        env, commands = plan(opts, home, Path(warm_dir))
        _show(env, commands)
        children = []
        for name, cmd in commands.items():
            children.append(_start(name, cmd, env, log_path, full, echo, lines, pumps))
            if name == TUNNEL:  # listening before the SuperNode first dials it
                _wait_listening(children[-1], opts.tunnel)
        supernode, tunnel = children[-1], children[list(commands).index(TUNNEL)]
        try:
            # Wait for the SuperNode itself, not for end of output: its SuperExec inherits the pipe
            # and may outlive it. Track its children while it lives, to stop them all afterwards.
            # Without its tunnel the SuperNode cannot reach anyone: stop when the tunnel fails.
            # Liveness 5 times a second, the /proc walk once a second: it reads every process on the host.
            ticks = 0
            while supernode.alive() and (tunnel.alive() or tunnel.popen.returncode == 0):
                if ticks % REFRESH_TICKS == 0:
                    for child in children:
                        child.refresh()
                ticks += 1
                time.sleep(0.2)
            tunnel_failed = supernode.alive()
        finally:
            for child in reversed(children):
                processes.stop(child)
        for pump in pumps:
            pump.join(timeout=2)
    said = [line.strip() for line in lines if line.startswith(site_tunnel.PREFIX)]
    if tunnel_failed:
        raise SiteRefused(f"the site tunnel stopped with status {tunnel.popen.returncode}: "
                          f"{said[-1] if said else 'see ' + str(log_path)}")
    refused = any(REFUSED_KEY in line for line in lines)
    if refused:
        raise SiteRefused(f"the coordinator refused this site's key ({opts.key.name}): it is not registered; send "
                          f"{opts.key.with_suffix('.pub').name} to the coordinator (fedhosp server --sites)")
    if supernode.popen.returncode not in (0, None, -2, 130):
        tls = [line for line in said if "TLS" in line]
        raise SiteRefused(tls[-1].removeprefix(site_tunnel.PREFIX) if tls else
                          f"the SuperNode stopped with status {supernode.popen.returncode}; see {log_path}")


def _wait_listening(child: processes.Child, port: int, timeout: float = 15.0) -> None:
    """Until something accepts on 127.0.0.1:`port`, `child` exits, or `timeout` passes (the SuperNode retries)."""
    deadline = time.monotonic() + timeout
    while child.alive() and time.monotonic() < deadline:
        try:
            socket.create_connection((site_tunnel.LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


def _show(env: dict[str, str], commands: dict[str, list[str]]) -> None:
    print(f"$ umask {UMASK:03o}", flush=True)
    processes.show_env(env)
    for cmd in commands.values():
        processes.show(cmd)


def _start(name: str, cmd: list[str], env: dict[str, str], log_path: Path, full: TextIO, echo: TextIO,
           lines: list[str], pumps: list[threading.Thread]) -> processes.Child:
    """Start one of the site's processes with its output copied to the site's log and the console."""
    popen = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             stdin=subprocess.DEVNULL, start_new_session=True, umask=UMASK)
    pumps.append(threading.Thread(target=_pump, args=(popen, full, echo, lines), daemon=True))
    pumps[-1].start()
    return processes.Child(name, popen, log_path)


def _pump(popen: subprocess.Popen[str], full: TextIO, echo: TextIO, lines: list[str]) -> None:
    """Copy a process's output to the site's log (each line timed: Flower's INFO lines are not) and the
    console; keep the lines for the verdict."""
    assert popen.stdout is not None
    for line in popen.stdout:
        full.write(f"{datetime.now().isoformat(sep=' ', timespec='milliseconds')} {line}")
        full.flush()
        print(line.rstrip(), file=echo, flush=True)
        lines.append(line)
