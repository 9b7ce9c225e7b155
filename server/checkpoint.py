"""The global model on disk: written atomically after every round, with the run's config inside.

A checkpoint carries the config it was trained with (as nanoGPT does), so a model
file is never separated from the settings needed to rebuild and judge it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
LAST = "checkpoint-last.pt"
MODEL = "model.pt"


def save(path: Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
         server_round: int, metrics: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "format": FORMAT,
            "round": server_round,
            "config": dict(config),
            "metrics": dict(metrics),
            "state_dict": dict(state_dict),
        },
        tmp,
    )
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
