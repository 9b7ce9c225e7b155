"""Communication: bytes per site per round, float32 vs float16 updates, and what float16 costs the model.

Bytes are Flower's own encoding of each message as it crosses Flower's wire in deployment (the
sum of its deflated objects: message, records, arrays, array chunks; its ArrayRecords packed
into one array each, as the ServerApp and ClientApp send them, common/flower_compat/packing.py), counted on
the grid between the ServerApp and the real ClientApp, for one round of the default model: down
(train and evaluate requests: the global weights and the run config, twice) and up (the update,
then the evaluation metrics). TLS and HTTP framing are not counted. The cost of `update-dtype =
float16` is the final held-out metric of the same federated run (same sites, data, seed and site
secrets, DP on as by default) with float32 and with float16 updates, over a few seeds; both runs
go through the real ServerApp loop and ClientApp in this process (simulation/inprocess.py).

Usage: python -m bench.communication [--sites 3] [--rounds 8] [--images 200] [--seeds 0,1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from bench import hospitals
from common.config import RunConfig
from common.flower_compat import packing
from common.grid_layer import GridLayer
from simulation.inprocess import run_inprocess


class MeteredGrid(GridLayer):
    """A Grid that counts every message's bytes, by message type and direction."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.bytes: dict[str, list[int]] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            self.bytes.setdefault(f"{msg.metadata.message_type}:down", []).append(packing.wire_bytes(msg))
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            if not msg.has_error():
                self.bytes.setdefault(f"{msg.metadata.message_type}:up", []).append(packing.wire_bytes(msg))
        return replies


def bytes_per_round(cfg: RunConfig, sites: int) -> dict[str, float]:
    """Bytes per site in one round, by direction, and the update (the train reply) alone."""
    grids: list[MeteredGrid] = []

    def wrap(grid: Grid) -> Grid:
        grids.append(MeteredGrid(grid))
        return grids[-1]  # type: ignore[return-value]

    run_inprocess(cfg, sites, wrap=wrap)
    counts = {k: statistics.median(v) for k, v in grids[0].bytes.items()}
    down = sum(v for k, v in counts.items() if k.endswith(":down"))
    up = sum(v for k, v in counts.items() if k.endswith(":up"))
    return {"down": down, "up": up, "total": down + up, "update": counts.get("train:up", 0.0)}


def final(cfg: RunConfig, sites: int) -> dict[str, float]:
    run_inprocess(cfg, sites)
    metrics = hospitals.final_metrics(cfg.out_dir)
    return {k: float(metrics[k]) for k in ("accuracy", "auc", "loss") if k in metrics}


def measure(root: Path, sites: int, rounds: int, images: int, seeds: list[int]) -> dict[str, Any]:
    one_round = {dtype: bytes_per_round(hospitals.ready(root, f"bytes-{dtype}", sites, images, **{
        "num-server-rounds": 1, "update-dtype": dtype}), sites) for dtype in ("float32", "float16")}
    runs: dict[str, list[dict[str, float]]] = {"float32": [], "float16": []}
    for seed in seeds:
        for dtype in runs:
            cfg = hospitals.ready(root, f"quality-{dtype}-{seed}", sites, images,
                                  **{"num-server-rounds": rounds, "update-dtype": dtype, "seed": seed})
            runs[dtype].append(final(cfg, sites))
    # float16 - float32 in points, per seed: the same runs but for the updates' precision (same DP noise)
    change = {m: [100 * (b[m] - a[m]) for a, b in zip(runs["float32"], runs["float16"], strict=True)]
              for m in runs["float32"][0] if m != "loss"}
    fp32, fp16 = one_round["float32"], one_round["float16"]
    return {"sites": sites, "rounds": rounds, "images_per_site": images, "seeds": seeds, "bytes": one_round,
            "update_ratio": fp16["update"] / fp32["update"], "up_ratio": fp16["up"] / fp32["up"],
            "total_ratio": fp16["total"] / fp32["total"], "final": runs, "float16_change_points": change}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--images", type=int, default=200, help="synthetic images per site")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.work or Path(tmp), args.sites, args.rounds, args.images,
                         [int(s) for s in args.seeds.split(",")])
    for dtype, b in result["bytes"].items():
        print(f"{dtype}: per site per round {b['down'] / 1024:.1f} KiB down, {b['up'] / 1024:.1f} KiB up "
              f"(update {b['update'] / 1024:.1f} KiB)")
    print(f"float16 update {result['update_ratio']:.2f}x the bytes, all traffic {result['total_ratio']:.2f}x; "
          f"final metric, float16 - float32 (points, per seed): {result['float16_change_points']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
