"""The global model on disk: written atomically after every round, with the run's config inside.

A checkpoint carries the config it was trained with (as nanoGPT does), so a model
file is never separated from the settings needed to rebuild and judge it. The final
model file also carries a model card (common/model_card.py) for the hospitals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.model_card import FILE_FORMAT, ModelCard
from server import durable

FORMAT = FILE_FORMAT  # one layout for checkpoints and model files; common/ owns it (hospitals read it)
LAST = "checkpoint-last.pt"
MODEL = "model.pt"


def save(path: Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
         server_round: int, metrics: Mapping[str, Any], card: ModelCard | None = None) -> None:
    content: dict[str, Any] = {
        "format": FORMAT,
        "round": server_round,
        "config": dict(config),
        "metrics": dict(metrics),
        "state_dict": dict(state_dict),
    }
    if card is not None:
        content["card"] = card.to_dict()
    durable.replace(path, lambda f: torch.save(content, f))


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def model_card(cfg: RunConfig, records: Sequence[Mapping[str, Any]]) -> ModelCard:
    """The card of a finished run, from its run log (one record per round, server/runlog.py).

    ε is the maximum over every round, not the last one: with fraction-train < 1 the
    site that spent the most may have sat out the final round. A run that finished no
    round (every site's budget spent) gets a card saying so: 0 rounds, no metrics.
    """
    last: Mapping[str, Any] = records[-1] if records else {"round": 0, "sites_ok": 0}
    epsilons = [float(r["train"]["epsilon-max"]) for r in records if "epsilon-max" in r.get("train", {})]
    return ModelCard.for_run(cfg, rounds=int(last["round"]), sites=int(last["sites_ok"]),
                             metrics=last.get("evaluate", {}), epsilon=max(epsilons) if epsilons else None)
