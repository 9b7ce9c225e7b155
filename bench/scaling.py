"""Scaling: wall time and peak memory of a simulated run at 10, 50 and 100 sites.

Flower's simulation engine (Ray) with the run's defaults and one core per virtual site:
every site trains and evaluates in every round. Memory is the whole process tree's
(this process, Ray's GCS, raylet and workers; simulation/memory.py): the sum of resident
set sizes (pages shared between processes counted once per process: an upper bound) and
of proportional set sizes (shared pages split between their users: what the machine
spends). Each size runs in a fresh process, so one run's memory never shows in the next.

Usage: python -m bench.scaling [--sizes 10,50,100] [--rounds 2] [--images 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import hospitals
from bench.framework import simulated, steady

GIB = 1024.0


def one(root: Path, sites: int, rounds: int, images: int, written: int) -> dict[str, Any]:
    cfg = hospitals.ready(root, f"sites-{sites}", sites, images, written, **{"num-server-rounds": rounds})
    run = simulated(cfg, sites, "ray")
    memory = run.pop("memory") or {}
    return {"sites": sites, **run, "steady_round_s": steady(run["round_s"]),
            "peak_rss_gib": memory.get("peak-rss-mb", 0) / GIB, "peak_pss_gib": memory.get("peak-pss-mb", 0) / GIB,
            "driver_rss_gib": memory.get("driver-peak-rss-mb", 0) / GIB, "processes": memory.get("peak-processes")}


def measure(root: Path, sizes: list[int], rounds: int, images: int) -> dict[str, Any]:
    runs = []
    for sites in sizes:
        out = root / f"scaling-{sites}.json"
        subprocess.run([sys.executable, "-m", "bench.scaling", "--one", str(sites), "--work", str(root),
                        "--rounds", str(rounds), "--images", str(images), "--written", str(max(sizes)),
                        "--out", str(out)], check=True)
        runs.append(json.loads(out.read_text()))
    return {"rounds": rounds, "images_per_site": images, "runs": runs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,100")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=40, help="synthetic images per site")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # one size, in this process
    parser.add_argument("--written", type=int, default=None, help=argparse.SUPPRESS)  # hospitals under --work
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.one is not None:
        result = one(args.work, args.one, args.rounds, args.images, args.written or args.one)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(args.work or Path(tmp), [int(s) for s in args.sizes.split(",")], args.rounds,
                             args.images)
        for r in result["runs"]:
            print(f"{r['sites']:>4} sites: total {r['total_s']:.1f}s, steady round {r['steady_round_s']:.1f}s, "
                  f"peak memory {r['peak_pss_gib']:.2f} GiB PSS / {r['peak_rss_gib']:.2f} GiB RSS "
                  f"({r['processes']} processes)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
