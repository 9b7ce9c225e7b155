"""`fedhosp server`: the coordinator's side of a real deployment, on Flower's own processes.

It starts a SuperLink (TLS, SuperNode authentication, no runtime installs) bound to
loopback, nginx on the hospitals' address in front of it (fedhosp/fleet_proxy.py: Fleet
API only, to clients with a certificate from the consortium CA), registers the hospitals'
public keys with `flwr supernode register`, submits our app with `flwr run --stream`,
prints our one line per round from the stream, and stops every process it started on
the way out. Each Flower command is printed before it runs. The SuperLink keeps its
state in a SQLite file, so hospitals' SuperNodes keep
their node ids across a coordinator restart and rejoin a `--resume`d run by themselves.

`--sites` is the whole membership, at every start: after registering its keys, every other
node the SuperLink knows is unregistered (`admit`), so removing a site's `.pub` and restarting
locks that site out. `flwr supernode ls` does not show which key a node has, so the node id
each key got is kept in `registered-sites.json` beside the database. Flower keeps an
unregistered node's key, and never accepts it again: a revoked site comes back with a new key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from common import flower_env
from common.config import to_toml
from common.errors import ConfigError, FedhospError
from common.flower_compat import cli_output
from fedhosp import fleet_proxy, processes
from fedhosp.certs import ServerCerts

log = logging.getLogger(__name__)
CONNECTION = "fedhosp"  # the SuperLink connection's name in the coordinator's FLWR_HOME/config.toml
LOOPBACK = "127.0.0.1"
# What the coordinator sees of the run's stream: our own log lines (not Flower's, nor Opacus's
# basicConfig copies), and the last line of any traceback from our code.
OWN_ERROR = re.compile(r"^(common|server|client)\.[\w.]+: ")
REGISTERED = "registered-sites.json"  # in the work folder: {node id: {"name", "key"}} for every key we registered
UNREGISTERED = "unregistered"  # a node's status in `flwr supernode ls` once revoked


class RunFailed(FedhospError):
    """The federated run ended in a state other than completed."""


@dataclass(frozen=True)
class ServerOptions:
    certs: Path
    sites: Path
    rounds: int
    out: Path
    app: Path
    resume: bool = False
    listen: str = "0.0.0.0:9092"  # the hospitals' address: Fleet API only (through nginx)
    control_port: int = 9093  # the SuperLink itself, on loopback: Fleet, Control and Runtime APIs
    run_config: Mapping[str, Any] = field(default_factory=dict)  # typed values (common/config.py parse_overrides)
    nginx: str | None = None
    start_timeout: float = 90.0

    @property
    def work(self) -> Path:
        return self.out / "coordinator"

    @property
    def flwr_home(self) -> Path:
        return self.work / "flwr-home"


def site_keys(folder: Path) -> dict[str, Path]:
    """`NAME.pub` files in `folder` (and one level of sub-folders), by site name."""
    if not folder.is_dir():
        raise ConfigError(f"--sites {folder}: no such folder; put each hospital's NAME.pub there")
    private = sorted(p.name for p in folder.rglob("*.key"))
    if private:
        raise ConfigError(f"--sites {folder} holds private keys ({', '.join(private[:3])}): a site's .key never "
                          "leaves the hospital; keep only the .pub files here")
    keys: dict[str, Path] = {}
    for path in sorted([*folder.glob("*.pub"), *folder.glob("*/*.pub")]):
        if path.stem in keys:
            raise ConfigError(f"two public keys for site {path.stem!r}: {keys[path.stem]} and {path}")
        keys[path.stem] = path.resolve()
    if not keys:
        raise ConfigError(f"--sites {folder}: no NAME.pub files; each hospital runs `fedhosp certs site NAME` "
                          "and sends its NAME.pub")
    return keys


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen {text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def flwr_config(opts: ServerOptions) -> str:
    """The coordinator's own `flwr` CLI reaches the SuperLink's Control API on loopback only."""
    ca = json.dumps(str(ServerCerts.in_dir(opts.certs).ca_cert.resolve()))
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{LOOPBACK}:{opts.control_port}"\nroot-certificates = {ca}\n')


def superlink_command(opts: ServerOptions) -> list[str]:
    certs = ServerCerts.in_dir(opts.certs.resolve())
    return [
        "flower-superlink",
        "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", LOOPBACK, "--port", str(opts.control_port),
        "--database", str((opts.work / "superlink.db").resolve()),
    ]


def register_command(name: str, key: Path, *, as_json: bool = False) -> list[str]:
    """`as_json`: Flower's JSON output, from which `register` reads the new node's id."""
    return ["flwr", "supernode", "register", str(key), CONNECTION, "--name", name,
            *(["--format", "json"] if as_json else [])]


def list_command() -> list[str]:
    return ["flwr", "supernode", "ls", CONNECTION, "--format", "json"]


def unregister_command(node_id: str) -> list[str]:
    return ["flwr", "supernode", "unregister", node_id, CONNECTION]


def run_config(opts: ServerOptions) -> dict[str, Any]:
    values = {"num-server-rounds": opts.rounds, "out-dir": str(opts.out.resolve()), "resume": opts.resume}
    return {**values, **opts.run_config}


def run_command(opts: ServerOptions) -> list[str]:
    pairs = " ".join(f"{k}={to_toml(v)}" for k, v in run_config(opts).items())
    return ["flwr", "run", str(opts.app.resolve()), CONNECTION, "--stream", "--run-config", pairs]


def status_command(run_id: str) -> list[str]:
    return ["flwr", "ls", CONNECTION, "--run-id", run_id, "--format", "json"]


def serve(opts: ServerOptions, echo: TextIO = sys.stdout) -> Path:
    """Run the whole federation; return the final model's path. Every started process is stopped."""
    if opts.resume and not (opts.out / "checkpoint-last.pt").is_file():
        raise ConfigError(f"--resume: no checkpoint-last.pt in {opts.out}; pass the stopped run's --out")
    with processes.stopping_on_sigterm(), coordinator_up(opts, echo) as (children, env):
        run_id = submit(opts, env, children, echo)
        status = run_status(run_id, env)
    if status.get("status") != "finished:completed":
        raise RunFailed(f"run {run_id} ended {status.get('status', 'in an unknown state')}"
                        f" ({status.get('status-details', '')}); the full stream is in {opts.work / 'run.log'}")
    return opts.out / "model.pt"


@contextmanager
def coordinator_up(opts: ServerOptions, echo: TextIO = sys.stdout) -> Iterator[tuple[list[processes.Child],
                                                                                    dict[str, str]]]:
    """SuperLink on loopback, the sites' keys registered, then nginx on the hospitals' address."""
    certs = ServerCerts.in_dir(opts.certs.resolve())
    certs.check()
    keys = site_keys(opts.sites)
    nginx = fleet_proxy.find_nginx(opts.nginx)
    host, port = parse_listen(opts.listen)
    if not (opts.app / "pyproject.toml").is_file():
        raise ConfigError(f"--app {opts.app}: no pyproject.toml; point it at the fedhosp source folder")
    opts.flwr_home.mkdir(parents=True, exist_ok=True)
    (opts.flwr_home / "config.toml").write_text(flwr_config(opts))
    env = flower_env.command_env(opts.flwr_home.resolve())
    processes.show_env(env)  # every command below runs with it
    with _children() as children:
        superlink = processes.start("SuperLink", superlink_command(opts), opts.work / "superlink.log", env)
        children.append(superlink)
        processes.wait_for_tls(superlink, LOOPBACK, opts.control_port, certs.ca_cert, opts.start_timeout)
        admit(keys, opts.work / REGISTERED, env)  # before hospitals can reach it
        config = opts.work / fleet_proxy.CONFIG
        config.write_text(fleet_proxy.render(host, port, opts.control_port, certs, opts.work.resolve(),
                                             fleet_proxy.run_body_bytes(run_config(opts))))
        proxy = processes.start("nginx", fleet_proxy.command(nginx, config.resolve()), opts.work / "nginx.out", env)
        children.append(proxy)
        processes.wait_for_tls(proxy, LOOPBACK if host in ("0.0.0.0", "::") else host, port, certs.ca_cert,
                               opts.start_timeout, client_certificate_required=True)
        print(f"hospitals connect to {host}:{port} (Fleet API only); the Control API stays on "
              f"{LOOPBACK}:{opts.control_port}", file=echo, flush=True)
        yield children, env


def admit(keys: Mapping[str, Path], record_path: Path, env: Mapping[str, str]) -> None:
    """Register every key in `keys`, then unregister every other node: `--sites` is the membership."""
    listed = list_nodes(env)
    record = {n: e for n, e in _load_record(record_path).items() if n in listed}  # a fresh database: none
    members: dict[str, str] = {}
    for name, key in keys.items():
        members[register(name, key, env, record, listed)] = name
        record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")  # each id, once it exists
    for node_id in to_unregister(listed, set(members)):
        name = record.get(node_id, {}).get("name", "a node fedhosp did not register")
        unregister(node_id, env)
        print(f"  {name} (node {node_id}): unregistered, its key is not in --sites", flush=True)


def to_unregister(listed: Mapping[str, str], members: set[str]) -> list[str]:
    """The node ids in `listed` ({node id: status}) still admitted though not among `members`."""
    return sorted(node_id for node_id, status in listed.items() if status != UNREGISTERED and node_id not in members)


def key_fingerprint(key: Path) -> str:
    """SHA-256 of a site's OpenSSH public key (type and key; the comment is free text)."""
    return hashlib.sha256(" ".join(key.read_text().split()[:2]).encode()).hexdigest()


def register(name: str, key: Path, env: Mapping[str, str], record: dict[str, dict[str, str]],
             listed: Mapping[str, str]) -> str:
    """Register `key` (or find the node an earlier start registered it as); return its node id."""
    fingerprint = key_fingerprint(key)
    cmd = register_command(name, key, as_json=True)
    processes.show(cmd)
    done = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    if done.returncode == 0 and (node_id := str(_json_out(done.stdout).get("node-id", ""))):
        record[node_id] = {"name": name, "key": fingerprint}
        return node_id
    if "already in use" not in text:
        raise ConfigError(f"registering {name} ({key}) failed: {_last_words(text)}")
    node_id = next((n for n, entry in record.items() if entry.get("key") == fingerprint), "")
    if not node_id:
        raise ConfigError(f"{name}'s key ({key}) is registered in this SuperLink's database, but not in "
                          f"{REGISTERED}, so other sites could not be told apart from it; remove superlink.db from "
                          "the work folder to register every site in --sites afresh")
    if listed.get(node_id) == UNREGISTERED:
        raise ConfigError(f"{name}'s key ({key}) was revoked (node {node_id}) and Flower never accepts it again: "
                          f"the hospital runs `fedhosp certs site {name}` in a new folder and sends the new .pub")
    print(f"  {name}: already registered (node {node_id})", flush=True)
    record[node_id]["name"] = name
    return node_id


def list_nodes(env: Mapping[str, str]) -> dict[str, str]:
    """{node id: status} of every node the SuperLink knows, revoked ones included."""
    cmd = list_command()
    processes.show(cmd)
    done = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, check=False)
    nodes = _json_out(done.stdout).get("nodes")
    if done.returncode != 0 or not isinstance(nodes, list):
        raise ConfigError(f"listing the SuperLink's nodes failed: {_last_words(done.stdout + done.stderr)}")
    return {str(node["node-id"]): str(node.get("status", "")) for node in nodes}


def unregister(node_id: str, env: Mapping[str, str]) -> None:
    cmd = unregister_command(node_id)
    processes.show(cmd)
    done = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"unregistering node {node_id} failed: {_last_words(done.stdout + done.stderr)}")


def _load_record(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc}); restore it or remove superlink.db beside it") from None
    return {str(k): dict(v) for k, v in loaded.items()}


def _json_out(stdout: str) -> dict[str, Any]:
    """The JSON object in a `flwr ... --format json` output (other lines may come before it)."""
    try:
        found = json.loads(stdout[stdout.index("{"):])
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def submit(opts: ServerOptions, env: Mapping[str, str], children: list[processes.Child], echo: TextIO) -> str:
    """`flwr run --stream`: the whole stream to run.log, our own lines to `echo`; return the run id."""
    cmd = run_command(opts)
    processes.show(cmd)
    run_id = ""
    with open(opts.work / "run.log", "a") as full:
        popen = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        children.append(processes.Child("flwr run", popen, opts.work / "run.log"))
        assert popen.stdout is not None
        for line in popen.stdout:
            full.write(line)
            full.flush()
            if started := cli_output.started_run(line):
                run_id = started
                print(f"run {run_id} submitted", file=echo, flush=True)
            elif line.strip() and (OWN_ERROR.match(line) or not cli_output.is_flower_line(line)):
                print(line.rstrip(), file=echo, flush=True)
        popen.wait()
    if not run_id:
        raise RunFailed(f"`flwr run` did not start a run (status {popen.returncode}): "
                        f"{_last_words((opts.work / 'run.log').read_text())}")
    return run_id


def run_status(run_id: str, env: Mapping[str, str]) -> dict[str, Any]:
    cmd = status_command(run_id)
    processes.show(cmd)
    done = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, check=False)
    return next((r for r in cli_output.listed_runs(done.stdout) if str(r.get("run-id")) == run_id), {})


def _last_words(text: str) -> str:
    lines = [ln.strip(" │╭╰─") for ln in text.splitlines() if ln.strip(" │╭╰─")]
    return lines[-1] if lines else "no output"


@contextmanager
def _children() -> Iterator[list[processes.Child]]:
    children: list[processes.Child] = []
    try:
        yield children
    finally:
        for child in reversed(children):
            processes.stop(child)
