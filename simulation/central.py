"""Each round's global model on the source's own test split, evaluated where the server runs.

The federation's evaluate replies are each site's validation split; a benchmark's figure is
on its official test split (BreastMNIST: 156 images), which no site holds. It is evaluated
here once per round with common.training, exactly as the baselines are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch.utils.data import DataLoader, TensorDataset

from common import decision, training
from common.config import RunConfig
from common.models import build_model, input_channels
from common.weights import load_record
from simulation.report import CENTRAL


@dataclass(frozen=True)
class TestSet:
    images: np.ndarray  # (N, S, S) grey or (N, C, S, S), in [0, 1]
    labels: np.ndarray

    def loader(self, channels: int = 1) -> DataLoader:
        """Batches for a model of `channels` inputs: grey images repeated to them, as a site decodes
        grey files for a colour model (common/data: `channels = 3` repeats grey)."""
        x = torch.from_numpy(self.images.astype(np.float32))
        x = x.unsqueeze(1) if x.ndim == 3 else x
        if x.shape[1] == 1 and channels > 1:
            x = x.expand(-1, channels, -1, -1)
        return DataLoader(TensorDataset(x, torch.from_numpy(self.labels.astype(np.int64))), batch_size=256)


def evaluate(model: torch.nn.Module, test: TestSet, task: str, channels: int = 1) -> dict[str, Any]:
    """Loss and metrics (at 0.5 for two classes); two classes, also the confusion `counts` on the grid of
    common/decision.py, from which the report scores the test split at each round's chosen threshold."""
    result = training.evaluate(model, test.loader(channels), torch.device("cpu"), task)
    out: dict[str, Any] = {"num-examples": result.num_examples, "loss": result.loss}
    out.update({k: v for k, v in result.metrics.items() if v is not None and not math.isnan(v)})
    if result.confusion:
        out["counts"] = decision.pooled(result.confusion, result.num_examples)
    return out


class CentralEvaluation:
    """Called by simulation/grid.py with every round's global weights; appends one line per round."""

    def __init__(self, cfg: RunConfig, test: TestSet) -> None:
        self.cfg, self.test = cfg, test
        self.path = Path(cfg.out_dir) / CENTRAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        cfg = self.cfg
        channels = input_channels(cfg.task, cfg.model, cfg.channels)
        model = build_model(cfg.task, cfg.model, channels, cfg.num_classes, cfg.image_size)
        load_record(model, arrays)
        with open(self.path, "a") as f:
            f.write(json.dumps({"round": server_round, **evaluate(model, self.test, cfg.task, channels)}) + "\n")

