"""What a frozen feature extractor can give BreastMNIST at all: a linear probe without DP (issue 20).

DP-SGD on a linear head only loses to the same head trained without noise, so a non-private logistic
regression (scikit-learn, its L2 strength chosen on a held-out fifth of the training images) on the same
features, fit on every training image the federation holds between its sites, bounds what a DP recipe that
trains only a head on them reaches. Where it sits below the quality goal (AUC 0.85), no DP setting meets the
goal with those features: the features, not the privacy, are the limit.

Features: the input of each model's head block (common/models/trainable.py `blocks`), as the model computes
it in evaluation: scatter-linear's GroupNorm'd scattering coefficients, and the penultimate layer of each
backbone `fedhosp pretrain` made for the quality pass (its weights file, loaded as `pretrained = PATH` loads it).

Usage: python -m bench.feature_ceiling [--weights MODEL=PATH ...]   (prints JSON)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench import quality

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # inverse L2 strengths tried (scikit-learn's C)
HELD_OUT = 0.2
SEED = 0


def head_inputs(model, test, channels: int) -> np.ndarray:
    """(N, d): what the model's head block receives for each image of `test` (a simulation.central.TestSet)."""
    import torch

    from common.models.trainable import blocks

    seen: list[torch.Tensor] = []
    head = blocks(model)[-1][1]
    hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach().flatten(1)))
    try:
        model.eval()
        with torch.no_grad():
            for x, _ in test.loader(channels):
                model(x)
    finally:
        hook.remove()
    return torch.cat(seen).numpy()


def probe(train: np.ndarray, labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray) -> dict[str, Any]:
    """Test AUC of an L2 logistic regression, C chosen by AUC on a stratified held-out part, refit on all;
    and `auc-oracle`, the best test AUC over every C: chosen on the test split itself, an upper bound."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    fit, held, y_fit, y_held = train_test_split(train, labels, test_size=HELD_OUT, stratify=labels,
                                                random_state=SEED)

    def auc(c: float, x, y, x_score, y_score) -> float:
        model = LogisticRegression(C=c, max_iter=5000).fit(x, y)
        return float(roc_auc_score(y_score, model.predict_proba(x_score)[:, 1]))

    chosen = max(C_GRID, key=lambda c: auc(c, fit, y_fit, held, y_held))
    on_test = {c: auc(c, train, labels, test, test_labels) for c in C_GRID}
    return {"auc": on_test[chosen], "C": chosen, "auc-oracle": max(on_test.values()), "features": int(train.shape[1]),
            "train-images": len(labels)}


def ceiling(name: str, weights: Path | None = None) -> dict[str, Any]:
    """The probe on one model's head inputs: registry model `name`, fresh or from a weights file."""
    import torch

    from common.models import build_model, input_channels, pretrained
    from simulation import pool
    from simulation.central import TestSet

    data = pool.load(quality.TASK_DATA, quality.SETTINGS["image-size"], quality.ROOT / "runs" / "pool-cache")
    torch.manual_seed(SEED)
    channels = input_channels("classification", name)
    model = build_model("classification", name, channels, 2, quality.SETTINGS["image-size"])
    if weights is not None:
        pretrained.load(model, str(weights), "classification", name)
    train = head_inputs(model, TestSet(data.images, data.labels), channels)
    test = head_inputs(model, TestSet(data.test_images, data.test_labels), channels)
    return {**probe(train, data.labels, test, data.test_labels), "weights": weights.name if weights else None}


def ceilings(weights: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """scatter-linear's features, and each pretrained front's (model@pool -> its weights file)."""
    return {"scatter-linear": ceiling("scatter-linear"),
            **{name: ceiling(name.split("@")[0], path) for name, path in weights.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="*", default=[], metavar="MODEL@POOL=PATH",
                        help="a backbone's weights file: resnet18@pbcblood=runs/quality/weights/resnet18-pbcblood.pt")
    args = parser.parse_args(argv)
    if not quality.TASK_DATA.is_file():
        print(f"skipped: {quality.TASK_DATA} not found")
        return 0
    named = dict(w.split("=", 1) for w in args.weights)
    print(json.dumps(ceilings({k: Path(v) for k, v in named.items()}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
