"""Framework overhead: a simulated federated run / the same local work done without Flower.

The baseline is what the sites would do if no framework stood between them: in one process,
one site after another, every site runs `Site.train` (the real DP training path, privacy
accounting included), the weights are averaged by example count, and every site runs
`Site.evaluate`. The simulation runs the same ServerApp and ClientApp through Flower's
engine (Ray, one core per virtual site, so two sites train at a time on two cores), and, for
reference, through simulation/inprocess.py (Flower's messages, no Ray). Same sites, data,
seed, DP noise and settings; decode caches on disk warm for all, nothing cached in memory.

Steady state: median round time over rounds 2.. (round 1 pays Ray's workers importing torch
and loading their sites' data). Including start-up: the whole run's wall time, engine start
and shutdown included. The three runs are made back to back in this process.

Usage: python -m bench.framework [--sites 10] [--rounds 3] [--images 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

import client.site
from bench import hospitals
from client.site import site_from_context
from common import privacy
from common.config import RunConfig
from common.data import digests
from common.models import build_model
from common.weights import to_record
from simulation.run import SimulationOptions, simulate

ENGINES = ("inprocess", "ray")  # Ray last: its shutdown must not overlap another run


def cold_start() -> None:
    """Forget what this process has cached (DP noise plans, file digests, decoded sites), so every run starts
    as a fresh process does; Ray's workers are fresh processes, and whichever run came first would pay alone."""
    privacy.forget()
    digests.forget()
    client.site._MEMO.clear()


def fedavg(updates: list[tuple[ArrayRecord, dict[str, Any]]]) -> ArrayRecord:
    total = sum(m["num-examples"] for _, m in updates)
    states = [(a.to_torch_state_dict(), m["num-examples"] / total) for a, m in updates]
    averaged = {k: sum(s[k].double() * w for s, w in states).to(v.dtype) for k, v in states[0][0].items()}
    return ArrayRecord(torch_state_dict=averaged)


def sequential(cfg: RunConfig, sites: int) -> dict[str, Any]:
    """The baseline: every round, each site trains, weights are averaged, each site evaluates."""
    started = time.monotonic()
    run_id = f"bench-sequential-{time.time_ns()}"
    torch.manual_seed(cfg.seed)
    arrays = to_record(build_model(cfg.task, cfg.model, 1, cfg.num_classes, cfg.image_size))
    members = [site_from_context(cfg, {"partition-id": pid}) for pid in range(sites)]
    rounds = []
    for server_round in range(1, cfg.num_server_rounds + 1):
        t = time.monotonic()
        arrays = fedavg([site.train(arrays, server_round, run_id) for site in members])
        scores = [site.evaluate(arrays, run_id) for site in members]
        rounds.append(time.monotonic() - t)
    accuracy = sum(s["accuracy"] * s["num-examples"] for s in scores) / sum(s["num-examples"] for s in scores)
    return {"total_s": time.monotonic() - started, "round_s": rounds, "accuracy": accuracy}


def simulated(cfg: RunConfig, sites: int, engine: str) -> dict[str, Any]:
    started = time.monotonic()
    extra = simulate(cfg, SimulationOptions(sites, synthesize=False, engine=engine))
    return {"total_s": time.monotonic() - started, "round_s": hospitals.round_seconds(cfg.out_dir),
            "accuracy": hospitals.final_metrics(cfg.out_dir).get("accuracy"), "memory": extra.get("memory")}


def steady(rounds: list[float]) -> float:
    return statistics.median(rounds[1:] or rounds)


def measure(root: Path, sites: int, rounds: int, images: int) -> dict[str, Any]:
    settings = {"num-server-rounds": rounds}
    configs = {name: hospitals.ready(root, name, sites, images, **settings) for name in ("sequential", *ENGINES)}
    cold_start()
    runs = {"sequential": sequential(configs["sequential"], sites)}
    for engine in ENGINES:
        cold_start()
        runs[engine] = simulated(configs[engine], sites, engine)
    seq = runs["sequential"]
    ratios = {engine: {"steady_state": steady(runs[engine]["round_s"]) / steady(seq["round_s"]),
                       "with_startup": runs[engine]["total_s"] / seq["total_s"]} for engine in ENGINES}
    return {"sites": sites, "rounds": rounds, "images_per_site": images, "settings": configs["sequential"].to_mapping(),
            "runs": runs, "over_sequential": ratios}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=200, help="synthetic images per site")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.work or Path(tmp), args.sites, args.rounds, args.images)
    for engine, r in result["over_sequential"].items():
        run = result["runs"][engine]
        print(f"{engine:<10} steady round {steady(run['round_s']):.1f}s, total {run['total_s']:.1f}s: "
              f"{r['steady_state']:.2f}x sequential in steady state, {r['with_startup']:.2f}x with start-up")
    seq = result["runs"]["sequential"]
    print(f"sequential steady round {steady(seq['round_s']):.1f}s, total {seq['total_s']:.1f}s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
