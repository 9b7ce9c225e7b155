"""Metrics from well-kept libraries: scikit-learn for classification, torchmetrics for segmentation."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import multiclass_jaccard_index
from torchmetrics.functional.segmentation import dice_score


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC; None when the labels hold a single class (AUC is undefined)."""
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) < probs.shape[1]:
        return None
    return float(roc_auc_score(labels, probs, multi_class="ovr"))


def segmentation(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Dice and IoU over all the site's pixels, foreground classes averaged (torchmetrics).

    Pooled over pixels rather than averaged per image: an image with no lesion and
    no prediction has no defined Dice, and pooling weights each pixel once.
    """
    dice = dice_score(pred, target, num_classes=num_classes, include_background=False, average="macro",
                      input_format="index", aggregation_level="global")
    iou = multiclass_jaccard_index(pred, target, num_classes=num_classes, average="none")[1:].mean()
    return {"dice": float(dice.mean()), "iou": float(iou)}
