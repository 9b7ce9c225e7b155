"""Membership inference against the global model (a figure, not a test): how much does DP hide?

The attack is the simplest one that works on overfit models (Yeom et al., 2018): a sample
whose loss under the global model is low was probably trained on. Its ROC AUC over the
sites' training images (members) vs their held-out images (non-members) is 0.5 when the
model reveals nothing. Federated training is FedAvg over `client.site.Site.train`, the
sites' real code path, averaged here in-process (no engine needed to measure the model).

Usage: python bench/membership.py [--sites 3] [--images 120] [--rounds 10] [--epsilon 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from client.site import Site
from common.config import RunConfig, SiteConfig
from common.data import synthetic
from common.models import build_model
from common.weights import to_record


def fedavg(run: RunConfig, sites: list[Site], run_id: str) -> torch.nn.Module:
    model = build_model(run.task, run.model, 1, run.num_classes, run.image_size)
    arrays = to_record(model)
    for server_round in range(1, run.num_server_rounds + 1):
        updates = [site.train(arrays, server_round, run_id) for site in sites]
        total = sum(m["num-examples"] for _, m in updates)
        states = [(a.to_torch_state_dict(), m["num-examples"] / total) for a, m in updates]
        averaged = {k: sum(s[k].float() * w for s, w in states) for k in states[0][0]}
        model.load_state_dict(averaged)
        arrays = to_record(model)
    return model


@torch.no_grad()
def losses(model: torch.nn.Module, dataset) -> np.ndarray:
    model.eval()
    x, y = dataset.tensors
    return F.cross_entropy(model(x), y, reduction="none").numpy()


def attack_auc(model: torch.nn.Module, sites: list[Site]) -> dict[str, float]:
    members = np.concatenate([losses(model, s.data()[0]) for s in sites])
    others = np.concatenate([losses(model, s.data()[1]) for s in sites])
    labels = np.r_[np.ones(len(members)), np.zeros(len(others))]
    return {"attack_auc": float(roc_auc_score(labels, -np.r_[members, others])),
            "member_loss": float(members.mean()), "non_member_loss": float(others.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--images", type=int, default=120, help="images per site (small: easy to overfit)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON here (make bench)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic.write_hospitals(root / "data", args.sites, seed=11, images_per_site=args.images)
        table = {}
        for label, dp in (("no DP", False), (f"DP eps={args.epsilon:g}", True)):
            run = RunConfig(num_server_rounds=args.rounds, local_epochs=args.local_epochs, batch_size=16,
                            val_fraction=0.5, dp_enabled=dp, dp_target_epsilon=args.epsilon,
                            dp_target_delta=1e-3, seed=11)
            sites = [Site(run, SiteConfig(str(root / "data" / f"site-{i:03d}"), str(root / label / str(i)), "cpu"), i)
                     for i in range(args.sites)]
            started = time.monotonic()
            model = fedavg(run, sites, label)
            table[label] = {**attack_auc(model, sites), "seconds": round(time.monotonic() - started, 1)}
            print(f"{label:>14}: attack AUC {table[label]['attack_auc']:.3f} "
                  f"(loss members {table[label]['member_loss']:.3f} vs held-out {table[label]['non_member_loss']:.3f})")
    print(json.dumps(table, indent=1))
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
