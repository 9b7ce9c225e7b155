"""Classification metrics from scikit-learn's reference implementations."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


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
