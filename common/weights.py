"""The one place that converts model weights to and from Flower's ArrayRecord.

Opacus wraps a model in GradSampleModule, whose state_dict keys gain a `_module.`
prefix; stripping it here keeps checkpoints and messages independent of whether
a site trained with DP.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord
from torch import nn

OPACUS_PREFIX = "_module."


def plain_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's weights on the CPU, without any wrapper's key prefix."""
    return OrderedDict(
        (key.removeprefix(OPACUS_PREFIX), value.detach().cpu())
        for key, value in model.state_dict().items()
    )


def to_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=plain_state_dict(model))


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Load weights into a plain (unwrapped) model; a shape or key mismatch raises."""
    state = record.to_torch_state_dict()
    model.load_state_dict(
        OrderedDict((key.removeprefix(OPACUS_PREFIX), value) for key, value in state.items())
    )
