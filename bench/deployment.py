"""Deployment round / simulation round: `fedhosp server` + `fedhosp client`s vs Flower's simulation engine.

The deployment is the real one on 127.0.0.1: a SuperLink with TLS and SuperNode
authentication behind nginx, one `fedhosp client` (SuperNode) per site, our app submitted
with `flwr run`. Then the same sites, data, settings and rounds run in Flower's simulation
engine (Ray). Round times are the ServerApp's own (train + evaluate, as in the run log).
Flower starts a `flwr-clientapp` process for every message; `fedhosp client` forks it from
a zygote that imported torch & co. once (fedhosp/warm_clientapp.py), and shortens the
SuperNode's fixed sleeps (common/flower_compat/waits.py). The deployment runs twice: as
`fedhosp client` runs it, and with `--stock-clientapp --stock-waits` (the hospitals' side
as Flower ships it; a fresh interpreter per message, whose import cost is timed apart),
so the table shows what both buy on the same run. Each site's log times every line, so
the table also splits a message's time at a site into its phases (`phases`).

Usage: python -m bench.deployment [--sites 3] [--rounds 2] [--images 200] [--import-repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import hospitals
from bench.framework import simulated, steady
from common import flower_env, process_tree
from common.config import RunConfig
from fedhosp import certs, processes

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1200.0


def _fedhosp(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **flower_env.DEPLOYMENT}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "fedhosp.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM (fedhosp stops its own Flower children on it), then SIGKILL whatever of its tree is left."""
    tree = process_tree.descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    for child in {*tree, *process_tree.descendants(proc.pid)}:
        process_tree.send(child, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def provision(work: Path, sites: int) -> list[str]:
    """The consortium's certificates and the sites' keys, as `fedhosp certs init|site|sign` make them."""
    certs.init(work / "certs", ["localhost"])
    (work / "pubs").mkdir(parents=True)
    names = [f"hosp-{i:02d}" for i in range(sites)]
    for name in names:
        keys = certs.site(name, work / name)
        certs.sign(keys.request, certs.ca_dir(work / "certs"), work / name)  # at the coordinator: mutual TLS
        (work / "pubs" / f"{name}.pub").write_bytes(keys.public.read_bytes())
    return names


def deploy(root: Path, cfg: RunConfig, sites: int, stock: bool = False, name: str | None = None,
           server_args: tuple[str, ...] = (), client_args: tuple[str, ...] = (), wait_s: float = 900,
           timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """`cfg`'s rounds through `fedhosp server` and `sites` `fedhosp client`s (its sites' folders); its round times.
    `server_args` / `client_args`: more flags for each (a run config, a site policy)."""
    work = root / (name or ("deployment-stock" if stock else "deployment"))
    names = provision(work, sites)
    fleet, control = processes.free_port(), processes.free_port()
    out = Path(cfg.out_dir)
    started = time.monotonic()
    server = _fedhosp(["server", "--certs", str(work / "certs"), "--sites", str(work / "pubs"),
                       "--rounds", str(cfg.num_server_rounds), "--out", str(out), "--listen", f"127.0.0.1:{fleet}",
                       "--control-port", str(control), "--min-sites", str(sites), "--site-wait", str(int(wait_s)),
                       "--round-timeout", str(int(wait_s)), *server_args], work / "server.log")
    clients = [
        _fedhosp(["client", "--server", f"127.0.0.1:{fleet}", "--ca", str(work / "certs" / "ca.crt"),
                  "--key", str(work / site / f"{site}.key"), "--data", str(cfg.site_data_path(i)),
                  "--state", str(cfg.site_state_dir(i)), "--device", "cpu",
                  "--runtime-port", str(processes.free_port()), "--tunnel-port", str(processes.free_port()),
                  *(["--stock-clientapp", "--stock-waits"] if stock else []), *client_args],
                 work / f"{site}.log")
        for i, site in enumerate(names)
    ]
    try:
        code = server.wait(timeout=timeout_s)
        total = time.monotonic() - started
    finally:
        for proc in [server, *clients]:
            _stop(proc)
    if code != 0:
        tail = (work / "server.log").read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"fedhosp server ({work.name}) exited {code}: {' | '.join(tail)}")
    return {"total_s": round(total, 1), "round_s": hospitals.round_seconds(out),
            "accuracy": hospitals.final_metrics(out).get("accuracy"),
            "phases": [phases(cfg.site_state_dir(i) / "supernode.log") for i in range(sites)]}


# Flower's INFO lines for one message at a SuperNode, in order; the site log times each line (fedhosp/hospital.py).
_MARKS = {"Receiving: ": "receiving", "Received successfully": "received", "Sending: ": "sending",
          "Sent successfully": "sent"}


def phases(site_log: Path) -> dict[str, dict[str, float]]:
    """Where a site's messages spent their time, median seconds per message kind: waiting for the message
    after the previous reply went out (the server aggregating, and the SuperNode's idle pull), receiving
    it from the SuperLink, the clientapp (start, pull from the SuperNode, train or evaluate, push back),
    and sending the reply to the SuperLink. The first message (no previous reply) counts from its arrival."""
    times: dict[str, list[float]] = {}
    last_sent: float | None = None
    kind, marks = "", {}
    for line in site_log.read_text(errors="replace").splitlines():
        mark = next((name for text, name in _MARKS.items() if text in line), None)
        if mark is None:
            continue
        stamp = datetime.fromisoformat(line[:23]).timestamp()
        if mark == "receiving":
            kind = "train" if "train message" in line else "evaluate"
            marks = {"receiving": stamp}
        marks[mark] = stamp
        if mark == "sent" and len(marks) == 4:
            spans = {"wait": marks["receiving"] - (last_sent if last_sent is not None else marks["receiving"]),
                     "receive": marks["received"] - marks["receiving"],
                     "clientapp": marks["sending"] - marks["received"], "send": marks["sent"] - marks["sending"]}
            for name, seconds in spans.items():
                times.setdefault(f"{kind}.{name}", []).append(seconds)
            last_sent = stamp
    medians: dict[str, dict[str, float]] = {}
    for key, values in times.items():
        kind, name = key.split(".")
        medians.setdefault(kind, {})[name] = statistics.median(values)
    return medians


def import_cost(repeats: int = 3) -> dict[str, float]:
    """What every deployment message pays first: a fresh interpreter importing our ClientApp (torch,
    Flower). Wall seconds, and CPU seconds (less sensitive to a loaded machine); medians."""
    wall, cpu = [], []
    for _ in range(repeats):
        before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        subprocess.run([sys.executable, "-c", "import client.app"], cwd=ROOT, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall.append(time.monotonic() - started)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def measure(root: Path, sites: int, rounds: int, images: int, import_repeats: int) -> dict[str, Any]:
    settings = {"num-server-rounds": rounds}
    deployed = deploy(root, hospitals.ready(root, "deployment", sites, images, **settings), sites)
    stock = deploy(root, hospitals.ready(root, "deployment-stock", sites, images, **settings), sites, stock=True)
    cfg = hospitals.ready(root, "simulation", sites, images, **settings)
    simulation = simulated(cfg, sites, "ray")
    return {"sites": sites, "rounds": rounds, "images_per_site": images, "deployment": deployed,
            "deployment_stock": stock, "simulation": simulation,
            "clientapp_import": import_cost(import_repeats),
            "first_round_over_simulation": deployed["round_s"][0] / simulation["round_s"][0],
            "steady_round_over_simulation": steady(deployed["round_s"]) / steady(simulation["round_s"]),
            "stock_steady_round_over_simulation": steady(stock["round_s"]) / steady(simulation["round_s"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=200, help="synthetic images per site")
    parser.add_argument("--import-repeats", type=int, default=3, help="timings of a fresh clientapp import")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.work or Path(tmp), args.sites, args.rounds, args.images, args.import_repeats)
    d, s = result["deployment"], result["simulation"]
    print(f"deployment rounds {[round(x, 1) for x in d['round_s']]} s, simulation {[round(x, 1) for x in s['round_s']]}"
          f" s: {result['steady_round_over_simulation']:.2f}x in steady state, round 1 "
          f"{result['first_round_over_simulation']:.2f}x; as shipped "
          f"{[round(x, 1) for x in result['deployment_stock']['round_s']]} s "
          f"({result['stock_steady_round_over_simulation']:.2f}x); "
          f"a fresh clientapp import costs {result['clientapp_import']['wall_s']:.1f}s "
          f"({result['clientapp_import']['cpu_s']:.1f} CPU s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
