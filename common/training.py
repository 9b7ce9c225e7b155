"""Local training and evaluation in plain PyTorch: no Flower, no config objects, no DP logic.

DP enters only through what the caller passes in (an Opacus-wrapped model,
optimizer and Poisson loader), so the same loop serves DP and non-DP sites.
Every loss here is a mean of per-sample losses: DP-SGD's per-sample gradients,
and so its privacy guarantee, are only right for losses that decompose by sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from common import decision, metrics

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Evaluation:
    num_examples: int
    loss: float
    metrics: dict[str, float | None] = field(default_factory=dict)
    # two classes: positives and TP/FP at each threshold of common/decision.py's grid, as fractions
    confusion: dict[str, float] = field(default_factory=dict)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice over the foreground classes present), Dice per image.

    Per image, not over the batch (as MONAI's DiceLoss(batch=True) would): a batch-level
    Dice couples samples, and Opacus's per-sample gradients would no longer bound any
    one patient's influence. No library offers a per-sample, DP-safe version we could
    reuse without pulling in MONAI, so it is written here (a few lines).
    """
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(dim=(2, 3))
    total = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    dice = (2 * inter + smooth) / (total + smooth)
    # Dice is undefined on an image without foreground: there only cross-entropy speaks
    # (otherwise the many lesion-free images teach the model never to predict a lesion).
    present = (onehot.sum(dim=(2, 3)) > 0).to(probs.dtype)
    per_image = ((1 - dice) * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)
    return ce + per_image.mean()


LOSSES: dict[str, LossFn] = {"classification": F.cross_entropy, "segmentation": dice_ce_loss}


def weighted_cross_entropy(weights: Sequence[float]) -> LossFn:
    """Cross-entropy with each image's term scaled by its class's weight, divided by the batch's size.

    Not torch's weighted mean (divided by the batch's summed weights): that couples every image's
    gradient to the other images' labels, and DP-SGD's bound on one patient's influence is only
    for losses that are a sum of per-image terms. Weights of 1 give exactly `F.cross_entropy`.
    """
    w = torch.tensor([float(v) for v in weights])

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=w.to(logits.device, logits.dtype), reduction="sum") / len(target)

    return loss


def loss_for(task: str, class_weights: Sequence[float] | None = None) -> LossFn:
    """A run's training loss: the task's, class-weighted where the run states weights (common/class_weights.py)."""
    return weighted_cross_entropy(class_weights) if task == "classification" and class_weights else LOSSES[task]


def train(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    loss_fn: LossFn = F.cross_entropy,
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
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
    return total / max(count, 1)


def one_step(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
             loss_fn: LossFn = F.cross_entropy) -> int:
    """One optimizer step on the loader's first batch; returns its size. An empty batch (Poisson sampling
    can draw one) is stepped too: under DP-SGD the step still adds its noise, and distributed DP's sum
    counts on every site's share of it. Per-sample gradients of no image cannot be formed, so a stand-in
    image takes its place with its loss times zero: its clipped gradient is exactly zero."""
    model.train()
    x, y = next(iter(loader))
    size, scale = len(y), 1.0
    if size == 0:
        x0, y0 = loader.dataset[0]
        x, y, scale = x0.unsqueeze(0), torch.as_tensor(y0).unsqueeze(0), 0.0
    x, y = x.to(device), y.to(device)
    optimizer.zero_grad(set_to_none=True)
    (loss_fn(model(x), y) * scale).backward()
    optimizer.step()
    return size


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, task: str = "classification") -> Evaluation:
    model.eval()
    loss_fn = LOSSES[task]
    loss_sum, outputs, targets = 0.0, [], []
    for x, y in loader:
        logits = model(x.to(device))
        loss_sum += loss_fn(logits, y.to(device)).item() * len(y)
        outputs.append(torch.softmax(logits, dim=1).cpu() if task == "classification" else logits.argmax(1).cpu())
        targets.append(y)
    if not targets:
        return Evaluation(0, float("nan"))
    out, target = torch.cat(outputs), torch.cat(targets)
    n = len(target)
    if task == "segmentation":
        num_classes = logits.shape[1]
        return Evaluation(n, loss_sum / n, metrics.segmentation(out, target, num_classes))
    p, t = out.numpy(), target.numpy()
    confusion = decision.confusion_rates(t, p) if p.shape[1] == 2 else {}
    return Evaluation(n, loss_sum / n, metrics.classification_summary(t, p), confusion)


