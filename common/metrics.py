"""Metrics from well-kept libraries: scikit-learn for classification, torchmetrics for segmentation.

Both are imported where they are used: together they cost ~4 s and ~150 MB at import (torchmetrics
pulls in torchvision and matplotlib), which every process importing the site's code paid before it
needed either (the CLI, each Ray worker; a classification site never needs torchmetrics' Dice).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from common import decision

ECE_BINS = 15


def accuracy(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> float:
    """Right calls over all; two classes called as everywhere (common/decision.py `predict`)."""
    return float((decision.predict(probs, threshold) == labels).mean()) if len(labels) else float("nan")


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC; None when the labels hold a single class (AUC is undefined)."""
    from sklearn.metrics import roc_auc_score

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
    from torchmetrics.functional.classification import multiclass_jaccard_index
    from torchmetrics.functional.segmentation import dice_score

    dice = dice_score(pred, target, num_classes=num_classes, include_background=False, average="macro",
                      input_format="index", aggregation_level="global")
    iou = multiclass_jaccard_index(pred, target, num_classes=num_classes, average="none")[1:].mean()
    return {"dice": float(dice.mean()), "iou": float(iou)}


SUMMARY = ("accuracy", "balanced-accuracy", "sensitivity", "specificity", "auc")


def classification_summary(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, sensitivity, specificity and AUC of scores `probs` (N, classes) against
    `labels`: what every classification report shows, so that a model calling one class for every image
    reads balanced accuracy 0.5 with sensitivity 0 or 1, whatever its accuracy and AUC.

    Two classes: class 1 is positive where its probability is >= `threshold` (0.5 unless given;
    common/decision.py); more classes: argmax and macro averages. Undefined values are None.
    """
    probs = np.asarray(probs)
    pred = decision.predict(probs, threshold)
    with _quiet():
        return {k: _plain(v) for k, v in _summary(labels, probs, pred, list(range(probs.shape[1]))).items()}


def classification_report(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """The clinical metrics of a labelled set: scikit-learn, and torchmetrics for calibration.

    Two classes: sensitivity, precision and F1 are for class 1 (the finding), specificity
    is class 0's recall; class 1 is called where its probability is >= `threshold` (0.5 unless
    given). More classes: argmax, each value the unweighted mean over classes (macro).
    An undefined value (no positive case, no positive prediction) is None, never 0.
    """
    num_classes = probs.shape[1]
    pred = decision.predict(probs, threshold)
    classes = list(range(num_classes))
    binary = num_classes == 2
    avg: dict[str, Any] = {"average": "binary", "pos_label": 1} if binary else {"average": "macro", "labels": classes}
    with _quiet():
        report = _classification(labels, probs, pred, classes, avg)
    report["averaging"] = "class 1 is positive" if binary else "macro over classes"
    return {k: _plain(v) for k, v in report.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Undefined values are reported as None, not as warnings."""
    from sklearn import exceptions as skm_exceptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", skm_exceptions.UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="A single label was found")
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        yield


def _summary(labels: np.ndarray, probs: np.ndarray, pred: np.ndarray, classes: list[int]) -> dict[str, Any]:
    from sklearn import metrics as skm

    avg: dict[str, Any] = ({"average": "binary", "pos_label": 1} if len(classes) == 2
                           else {"average": "macro", "labels": classes})
    if len(labels) == 0:
        return dict.fromkeys(SUMMARY)
    return {
        "accuracy": skm.accuracy_score(labels, pred),
        "balanced-accuracy": skm.balanced_accuracy_score(labels, pred),
        "sensitivity": skm.recall_score(labels, pred, zero_division=np.nan, **avg),
        "specificity": _specificity(labels, pred, classes),
        "auc": roc_auc(labels, probs),
    }


def _classification(labels: np.ndarray, probs: np.ndarray, pred: np.ndarray, classes: list[int],
                    avg: dict[str, Any]) -> dict[str, Any]:
    from sklearn import metrics as skm

    return {
        "images": len(labels),
        **_summary(labels, probs, pred, classes),
        "precision": skm.precision_score(labels, pred, zero_division=np.nan, **avg),
        "recall": skm.recall_score(labels, pred, zero_division=np.nan, **avg),
        "f1": skm.f1_score(labels, pred, zero_division=np.nan, **avg),
        "ece": calibration_error(labels, probs),
        "confusion-matrix": skm.confusion_matrix(labels, pred, labels=classes).tolist(),
    }


def _specificity(labels: np.ndarray, pred: np.ndarray, classes: list[int]) -> float:
    """TN / (TN + FP): class 0's recall for two classes, else the mean of each class's one-vs-rest value."""
    from sklearn import metrics as skm

    if len(classes) == 2:
        return skm.recall_score(labels, pred, pos_label=0, average="binary", zero_division=np.nan)
    per_class = skm.multilabel_confusion_matrix(labels, pred, labels=classes)  # [[tn, fp], [fn, tp]]
    values = [tn / (tn + fp) for (tn, fp), _ in per_class if tn + fp > 0]
    return float(np.mean(values)) if values else float("nan")


def calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (L1, equal-width bins), torchmetrics.

    Two classes: of the predicted probability of class 1 against the truth (the reliability
    diagram's ECE); more classes: of the top class's confidence against being right.
    """
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    p, t = torch.from_numpy(np.asarray(probs, dtype=np.float64)), torch.from_numpy(np.asarray(labels))
    if probs.shape[1] == 2:
        return float(binary_calibration_error(p[:, 1].contiguous(), t, n_bins=n_bins))
    return float(multiclass_calibration_error(p, t, num_classes=probs.shape[1], n_bins=n_bins))


def hausdorff(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Mean symmetric Hausdorff distance (pixels at the model's input size), torchmetrics, per image and class.

    It is only defined where both the prediction and the truth hold the class: the other
    images are counted instead (`hausdorff-undefined`: a lesion missed or a false alarm).
    """
    from torchmetrics.functional.segmentation import hausdorff_distance

    distances, undefined = [], 0
    for p, t in zip(pred, target, strict=True):
        for c in range(1, num_classes):
            pc, tc = (p == c).long(), (t == c).long()
            has_p, has_t = bool(pc.any()), bool(tc.any())
            if has_p and has_t:
                d = hausdorff_distance(pc[None], tc[None], num_classes=2, input_format="index")
                distances.append(float(d))
            elif has_p or has_t:
                undefined += 1
    mean = float(np.mean(distances)) if distances else None
    return {"hausdorff": mean, "hausdorff-images": len(distances), "hausdorff-undefined": undefined}


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN (undefined) to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
