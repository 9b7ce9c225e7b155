"""Load: `fedhosp server` and 20 `fedhosp client`s on 127.0.0.1, one of them sending garbage every round.

Everything as a consortium runs it: a SuperLink with TLS and SuperNode authentication behind nginx
with mutual TLS, each site provisioned with `fedhosp certs site` + `fedhosp certs sign` and reaching
the coordinator through its site tunnel (fedhosp/site_tunnel.py). The smallest model (the default
cnn at 32 px), tiny synthetic sites, one local epoch, train rounds only (fraction-evaluate 0). One
site's ClientApp is replaced, by its own environment only (bench/garbage_site/sitecustomize.py),
with one that answers every message with a malformed reply: the run must finish every round with
that reply rejected each time. Recorded: each round's wall time (the ServerApp's), the sites
accepted and rejected per round, and the coordinator's peak resident memory (the `fedhosp server`
process tree: SuperLink, nginx, `flwr run`, the ServerApp), sampled twice a second.

Each site dials from an address of its own (127.0.0.2, .3, ...: `--source-address`), as hospitals do:
nginx's per-address limits (fedhosp/fleet_proxy.py) are for one site or one NAT, not for 20 sites on one
address. The sites run Flower's stock clientapp (`--stock-clientapp`: a fresh interpreter per message), not
the warm zygote: 20 zygotes holding torch would take ~20 x 0.4 GB on a 2-core machine shared with
others; with train rounds only, each site pays one interpreter start a round instead.

Usage: python -m bench.load [--sites 20] [--rounds 3] [--images 24] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.deployment import ROOT, _stop
from common import flower_env, process_tree
from common.data.synthetic import write_hospitals
from fedhosp import certs, processes
from server import runlog

GARBAGE = Path(__file__).resolve().parent / "garbage_site"  # on the garbage site's PYTHONPATH only
TIMEOUT_S = 1500.0


def _fedhosp(args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **flower_env.DEPLOYMENT, **(extra_env or {})}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "fedhosp.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env, start_new_session=True)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss(threading.Thread):
    """The peak summed RSS of a process tree, sampled until stopped."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.largest = pid, every, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            sizes = [_rss_bytes(self.pid), *(_rss_bytes(p.pid) for p in process_tree.descendants(self.pid))]
            self.peak = max(self.peak, sum(sizes))
            self.largest = max(self.largest, max(sizes))
            self.done.wait(self.every)


def measure(root: Path, sites: int, rounds: int, images: int) -> dict[str, Any]:
    work = root / "load"
    certs.init(work / "certs", ["localhost"])
    (work / "pubs").mkdir(parents=True)
    names = [f"hosp-{i:02d}" for i in range(sites)]
    for name in names:
        keys = certs.site(name, work / name)
        certs.sign(keys.request, certs.ca_dir(work / "certs"), work / name)  # at the coordinator
        (work / "pubs" / f"{name}.pub").write_bytes(keys.public.read_bytes())
    data = write_hospitals(work / "data", num_sites=sites, seed=3, images_per_site=images)
    garbage = names[-1]
    fleet, control = processes.free_port(), processes.free_port()
    out = work / "run"
    started = time.monotonic()
    server = _fedhosp(["server", "--certs", str(work / "certs"), "--sites", str(work / "pubs"),
                       "--rounds", str(rounds), "--out", str(out), "--listen", f"127.0.0.1:{fleet}",
                       "--control-port", str(control), "--min-sites", str(sites), "--site-wait", "900",
                       "--round-timeout", "900",
                       "--run-config", "local-epochs=1 fraction-evaluate=0.0 dp-target-epsilon=8.0 batch-size=16"],
                      work / "server.log")
    peak = PeakRss(server.pid)
    peak.start()
    clients = [
        _fedhosp(["client", "--server", f"127.0.0.1:{fleet}", "--ca", str(work / "certs" / "ca.crt"),
                  "--key", str(work / name / f"{name}.key"), "--data", str(data[i]), "--device", "cpu",
                  "--runtime-port", str(processes.free_port()), "--tunnel-port", str(processes.free_port()),
                  "--source-address", f"127.0.0.{i + 2}", "--stock-clientapp"],
                 work / f"{name}.log", {"PYTHONPATH": str(GARBAGE)} if name == garbage else None)
        for i, name in enumerate(names)
    ]
    try:
        code = server.wait(timeout=TIMEOUT_S)
        total = time.monotonic() - started
    finally:
        peak.done.set()
        for proc in [server, *clients]:
            _stop(proc)
    if code != 0:
        tail = (work / "server.log").read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"fedhosp server exited {code}: {' | '.join(tail)}")
    records = runlog.read(out / runlog.RUN_LOG)
    garbage_said = (work / f"{garbage}.log").read_text(errors="replace").count("garbage site: round")
    return {
        "sites": sites, "rounds": rounds, "images_per_site": images, "model": "cnn", "image_size": 32,
        "clientapp": "stock", "total_s": total,
        "round_s": [float(r["seconds"]) for r in records],
        "sites_ok": [r["sites_ok"] for r in records],
        "sites_rejected": [r["sites_rejected"] for r in records],
        "rejected_reasons": [[x.get("class") for x in r.get("rejected", [])] for r in records],
        "garbage_replies_sent": garbage_said,
        "coordinator_peak_rss_mib": round(peak.peak / 2**20, 1),
        "coordinator_largest_process_rss_mib": round(peak.largest / 2**20, 1),
        "completed": [r["round"] for r in records] == list(range(1, rounds + 1)),
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """bench/table.py's rows for this section."""
    ok = r["completed"] and all(n >= 1 for n in r["sites_rejected"])
    return [("load", f"{r['sites']} sites over mTLS, one sending garbage: rounds completed, rejected per round",
             f"{len(r['round_s'])}/{r['rounds']}, {r['sites_rejected']}", "all, >= 1 each", "met" if ok else "MISSED"),
            ("load", "round wall time (s)", ", ".join(f"{x:.1f}" for x in r["round_s"]), "", ""),
            ("load", "coordinator peak RSS (MiB, whole tree)", f"{r['coordinator_peak_rss_mib']:.0f}", "", "")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=24, help="synthetic images per site")
    parser.add_argument("--work", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    processes.become_subreaper()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.work or Path(tmp), args.sites, args.rounds, args.images)
    print(f"{result['sites']} sites, {result['rounds']} rounds: round times "
          f"{[round(x, 1) for x in result['round_s']]} s, accepted {result['sites_ok']}, rejected "
          f"{result['sites_rejected']} per round; coordinator peak RSS {result['coordinator_peak_rss_mib']} MiB")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if not result["completed"] or any(n < 1 for n in result["sites_rejected"]):
        raise SystemExit("the run did not complete every round with the garbage site rejected")
    return result


if __name__ == "__main__":
    main()
