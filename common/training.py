"""Local training and evaluation in plain PyTorch: no Flower, no config objects, no DP logic.

DP enters only through what the caller passes in (an Opacus-wrapped model,
optimizer and Poisson loader), so the same loop serves DP and non-DP sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from common import metrics


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    auc: float | None
    num_examples: int


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def train(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
) -> float:
    """Run `epochs` passes; return the mean training loss per example."""
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            if len(y) == 0:  # Poisson sampling can draw an empty batch
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> EvalResult:
    model.eval()
    losses, probs, labels = [], [], []
    for x, y in loader:
        logits = model(x.to(device))
        losses.append(F.cross_entropy(logits, y.to(device), reduction="sum").item())
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        labels.append(y.numpy())
    if not labels:
        return EvalResult(float("nan"), float("nan"), None, 0)
    p, t = np.concatenate(probs), np.concatenate(labels)
    return EvalResult(sum(losses) / len(t), metrics.accuracy(t, p), metrics.roc_auc(t, p), len(t))
