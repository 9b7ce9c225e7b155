"""Strategy x partition table (a figure, not a test): which aggregation survives which non-IID split?

Each cell is one federated run of the real ServerApp loop and ClientApp, in-process
(simulation/inprocess.py: no Ray start-up per cell), over the same 5 virtual sites
per partition, with the same seed, rounds, local epochs and learning rate; accuracy
is the final global model's on the pool's held-out test set (BreastMNIST: its official
test split; synthetic: a fresh synthetic test set), the same images for every cell.
No DP here, so the table shows the strategies, not the noise; local SGD has momentum
0.9 except under SCAFFOLD, whose control variates assume plain SGD (momentum 0).

Usage: python bench/strategies.py [--data PATH.npz] [--rounds 8] [--out bench/strategies.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import metrics
from common.config import RunConfig
from common.models import build_model
from server import checkpoint
from simulation import pool as pools
from simulation import virtual_sites
from simulation.inprocess import run_inprocess
from simulation.virtual_sites import PartitionOptions

STRATEGIES = {
    "fedavg": {}, "fedprox": {"proximal-mu": 0.01}, "fedadam": {"server-learning-rate": 0.01},
    "fedyogi": {"server-learning-rate": 0.01}, "fedadagrad": {"server-learning-rate": 0.01}, "fedmedian": {},
    "fedtrimmedavg": {}, "krum": {"num-malicious-sites": 1}, "bulyan": {}, "scaffold": {"momentum": 0.0},
}
PARTITIONS = {"iid": PartitionOptions("iid"), "dirichlet-0.5": PartitionOptions("dirichlet", 0.5),
              "dirichlet-0.1": PartitionOptions("dirichlet", 0.1)}
SITES = 5


def test_accuracy(model_path: Path, cfg: RunConfig, pool: pools.Pool) -> tuple[float, float | None]:
    model = build_model(cfg.task, cfg.model, 1, cfg.num_classes, cfg.image_size)
    model.load_state_dict(checkpoint.load(model_path)["state_dict"])
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(pool.test_images.astype(np.float32)).unsqueeze(1)
        probs = torch.softmax(model(x), dim=1).numpy()
    labels = pool.test_labels.astype(np.int64)
    return metrics.accuracy(labels, probs), metrics.roc_auc(labels, probs)


def run_cell(root: Path, sites_dir: Path, strategy: str, settings: dict, pool: pools.Pool) -> dict:
    out = root / "runs" / sites_dir.name / strategy
    cfg = RunConfig.from_mapping({**settings, **STRATEGIES[strategy], "strategy": strategy,
                                  "data-root": str(sites_dir), "state-root": str(out / "sites"), "out-dir": str(out)})
    started = time.monotonic()
    run_inprocess(cfg, SITES)
    accuracy, auc = test_accuracy(out / checkpoint.MODEL, cfg, pool)
    return {"accuracy": round(accuracy, 4), "auc": None if auc is None else round(auc, 4),
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a MedMNIST .npz (default: a synthetic pool)")
    parser.add_argument("--images", type=int, default=2500, help="synthetic pool size")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=None, help="default: 28 for .npz, 32 synthetic")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=Path("bench/strategies.json"))
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    size = args.image_size or (28 if args.data else 32)
    settings = {"num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": 32,
                "learning-rate": 0.05, "momentum": 0.9, "dp-enabled": False, "image-size": size,
                "min-available-sites": SITES, "seed": 0, "val-fraction": 0.1}
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = pools.load(args.data, size, root / "cache", synthetic_images=args.images, seed=0)
        print(f"pool: {pool.source}; test set {len(pool.test_labels)} images", flush=True)
        for pname, opts in PARTITIONS.items():
            sites_dir = root / pname
            summary = virtual_sites.write(pool, sites_dir, SITES, opts, seed=0)
            print(f"{pname}: sizes {summary['sizes']}, label counts {summary['label-counts']}", flush=True)
            for strategy in args.strategies.split(","):
                cell = run_cell(root, sites_dir, strategy, settings, pool)
                table.setdefault(strategy, {})[pname] = cell
                print(f"  {strategy:<14} {pname:<14} acc {cell['accuracy']:.3f}  ({cell['seconds']}s)", flush=True)
    print(f"\n{'strategy':<14}" + "".join(f"{p:>15}" for p in PARTITIONS))
    for strategy, row in table.items():
        print(f"{strategy:<14}" + "".join(f"{row[p]['accuracy']:>15.3f}" for p in PARTITIONS if p in row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": pool.source, "settings": settings, "table": table}, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
