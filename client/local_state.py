"""What a site keeps between rounds of one run and never sends: FedBN's normalization layers
and SCAFFOLD's control variate, one file each per run in the site's state folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.site_state import SiteState

NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, _BatchNorm)


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's normalization layers (FedBN keeps exactly these local)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, NORMS):
            keys += [f"{name}.{k}" for k in module.state_dict()]
    return keys


def load(state: SiteState | str | Path, kind: str, run_id: str) -> dict[str, torch.Tensor] | None:
    return SiteState.at(state).load_tensors(name(kind, run_id))


def save(state: SiteState | str | Path, kind: str, run_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
    SiteState.at(state).save_tensors(name(kind, run_id), {k: v.detach().cpu() for k, v in tensors.items()})


def name(kind: str, run_id: str) -> str:
    """`local/<kind>-<run id>.pt` in the site's state folder."""
    return f"local/{SiteState.run_name(kind, run_id)}"
