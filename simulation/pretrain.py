"""`fedhosp pretrain`: a backbone trained without DP on a public pool, for `pretrained = PATH`.

At ~100 images a site DP-SGD cannot learn features; a consortium can instead start from a
model trained on public data (a MedMNIST-style `.npz`, a labelled folder) that no hospital
contributed to, so it costs no patient's privacy. The pool is decoded by the same code as the
simulation's pools (simulation/pool.py: the sites' own decode path at the model's input size),
the model is any registry model, and the output is a plain state_dict `.pt` plus a JSON sidecar
saying what made it (pool and its digest, model, epochs, the weights' SHA-256). The head is
sized for the pool's classes: loading it for a task with other classes re-initialises the head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from common import metrics, training
from common.errors import ConfigError
from common.models import REGISTRY, build_model
from simulation import pool as pools

log = logging.getLogger(__name__)
SIDECAR_SUFFIX = ".json"
MOMENTUM = 0.9  # the runs' default (pyproject's momentum)


@dataclass(frozen=True)
class PretrainOptions:
    data: Path
    model: str
    out: Path
    image_size: int  # the runs' image-size the weights are for
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 0.05  # SGD with MOMENTUM
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        spec = REGISTRY.get(self.model)
        if spec is None or spec.task != "classification":
            names = ", ".join(n for n, s in REGISTRY.items() if s.task == "classification")
            raise ConfigError(f"--model {self.model}: pretrain trains a classification model, one of {names}")
        for name, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if value < 1:
                raise ConfigError(f"{name} = {value}: must be at least 1")
        if self.learning_rate <= 0:
            raise ConfigError(f"--lr = {self.learning_rate:g}: must be > 0")
        if self.out.suffix != ".pt":
            raise ConfigError(f"--out {self.out}: name the weights file *.pt (the sidecar is *.json beside it)")


def sidecar(weights: Path) -> Path:
    return weights.with_suffix(SIDECAR_SUFFIX)


def pretrain(opts: PretrainOptions) -> dict[str, Any]:
    """Train opts.model on the pool; write the weights and the sidecar; return the sidecar's content."""
    opts.check()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedhosp-pretrain-") as cache_dir:
        data = pools.load(opts.data, opts.image_size, Path(cache_dir))
    num_classes = int(max(data.labels.max(), data.test_labels.max() if data.has_test else 0)) + 1
    if num_classes < 2:
        raise ConfigError(f"--data {opts.data}: every image has label {int(data.labels.max())}: a pool needs "
                          "at least two classes to train on")
    device = training.pick_device(opts.device)
    torch.manual_seed(opts.seed)
    model = build_model("classification", opts.model, 1, num_classes, opts.image_size).to(device)
    loader = DataLoader(_dataset(data.images, data.labels), batch_size=opts.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(opts.seed))
    calibrated = _calibrate(model, loader)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=opts.learning_rate, momentum=MOMENTUM)
    log.info("pretrain %s on %s: %d classes, %d epochs", opts.model, data.source, num_classes, opts.epochs)
    loss = training.train(model, loader, optimizer, opts.epochs, device, training.LOSSES["classification"])
    held_out = _score(model, data, device) if data.has_test else None
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, opts.out)
    card = {
        "pool": str(opts.data),
        "pool-source": data.source,
        "pool-digest": data.digest,
        "model": opts.model,
        "in-channels": 1,
        "num-classes": num_classes,
        "image-size": opts.image_size,
        "epochs": opts.epochs,
        "calibrated": calibrated,
        "train-examples": len(data.labels),
        "train-loss": loss,
        "test": held_out,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "seconds": round(time.monotonic() - started, 1),
        "sha256": hashlib.sha256(opts.out.read_bytes()).hexdigest(),
    }
    sidecar(opts.out).write_text(json.dumps(card, indent=1))
    return card


def _calibrate(model: torch.nn.Module, loader: DataLoader) -> str | None:
    """A fixed front end (the scattering models' `calibrate`) takes its normalisation from the pool's
    statistics, then stays frozen: SGD on the pool's labels would fit it to the pool's task instead."""
    calibrate = getattr(model, "calibrate", None)
    if calibrate is None:
        return None
    module = calibrate(x for x, _ in loader)
    module.requires_grad_(False)
    return "per-channel mean and std of the pool's features"


def _dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


@torch.no_grad()
def _score(model: torch.nn.Module, data: pools.Pool, device: torch.device) -> dict[str, Any]:
    """The pool's own test split: how good the features are on the task they were trained for."""
    assert data.test_images is not None and data.test_labels is not None
    model.eval()
    loader = DataLoader(_dataset(data.test_images, data.test_labels), batch_size=256)
    probs = torch.cat([torch.softmax(model(x.to(device)), dim=1).cpu() for x, _ in loader]).numpy()
    report = metrics.classification_report(data.test_labels, probs)
    return {k: report[k] for k in ("images", "accuracy", "balanced-accuracy", "auc")}
