"""The clinical metrics on fixed predictions, against references computed here independently."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import directed_hausdorff
from sklearn import metrics as skm

from common import metrics

EXACT = 1e-12

# 5 positives, 7 negatives; no probability on an ECE bin edge (k/15)
LABELS = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
P1 = np.array([0.95, 0.85, 0.62, 0.35, 0.10, 0.75, 0.45, 0.30, 0.25, 0.15, 0.05, 0.55])
PROBS = np.stack([1 - P1, P1], axis=1)


def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Equal-width bins, L1: sum over bins of |accuracy - confidence| weighted by the bin's share."""
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(index):
        inside = index == b
        total += abs(correct[inside].mean() - confidence[inside].mean()) * inside.mean()
    return total


def test_binary_report_matches_counts_and_scikit_learn():
    report = metrics.classification_report(LABELS, PROBS)
    tp, fn, fp, tn = 3, 2, 2, 5  # counted by hand from the arrays above (threshold 0.5)
    pred = (P1 > 0.5).astype(int)
    assert report["confusion-matrix"] == [[tn, fp], [fn, tp]] == skm.confusion_matrix(LABELS, pred).tolist()
    assert report["accuracy"] == pytest.approx((tp + tn) / 12, abs=EXACT)
    assert report["sensitivity"] == report["recall"] == pytest.approx(tp / (tp + fn), abs=EXACT)
    assert report["specificity"] == pytest.approx(tn / (tn + fp), abs=EXACT)
    assert report["precision"] == pytest.approx(tp / (tp + fp), abs=EXACT)
    assert report["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=EXACT)
    assert report["balanced-accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2, abs=EXACT)
    assert report["auc"] == skm.roc_auc_score(LABELS, P1)
    assert report["ece"] == pytest.approx(_ece(P1, LABELS.astype(float)), abs=1e-6)  # torchmetrics in float64
    assert report["images"] == 12


def test_multiclass_report_is_macro_over_classes():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.35, 0.35],
                      [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7], [0.1, 0.55, 0.35], [0.3, 0.3, 0.4]])
    report = metrics.classification_report(labels, probs)
    pred = probs.argmax(axis=1)
    cm = skm.confusion_matrix(labels, pred)
    assert report["confusion-matrix"] == cm.tolist()
    assert report["sensitivity"] == skm.recall_score(labels, pred, average="macro")
    assert report["precision"] == skm.precision_score(labels, pred, average="macro")
    assert report["f1"] == skm.f1_score(labels, pred, average="macro")
    assert report["auc"] == skm.roc_auc_score(labels, probs, multi_class="ovr")
    fp = cm.sum(axis=0) - np.diag(cm)
    tn = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
    assert report["specificity"] == pytest.approx(np.mean(tn / (tn + fp)), abs=EXACT)
    confidence, correct = probs.max(axis=1), (pred == labels).astype(float)
    assert report["ece"] == pytest.approx(_ece(confidence, correct), abs=1e-6)


def test_undefined_metrics_are_none_not_zero():
    report = metrics.classification_report(np.zeros(4, dtype=int), np.tile([0.8, 0.2], (4, 1)))
    assert report["sensitivity"] is None and report["precision"] is None and report["auc"] is None
    assert report["specificity"] == 1.0


def _squares(*boxes):
    masks = torch.zeros(len(boxes), 16, 16, dtype=torch.long)
    for i, box in enumerate(boxes):
        if box:
            r0, r1, c0, c1 = box
            masks[i, r0:r1, c0:c1] = 1
    return masks


def test_segmentation_metrics_match_counts_and_scipy():
    pred = _squares((2, 6, 2, 6), (0, 3, 0, 3), (1, 2, 1, 2), None)
    target = _squares((3, 8, 3, 7), (10, 14, 9, 15), None, None)
    out = {**metrics.segmentation(pred, target, 2), **metrics.hausdorff(pred, target, 2)}
    inter, p, t = 9, 16 + 9 + 1, 20 + 24  # pixel counts of the squares above, pooled over images
    assert out["dice"] == pytest.approx(2 * inter / (p + t), abs=1e-6)
    assert out["iou"] == pytest.approx(inter / (p + t - inter), abs=1e-6)
    expected = []
    for i in (0, 1):  # defined where both masks hold the lesion; image 2 is a false alarm, image 3 empty
        a, b = np.argwhere(pred[i].numpy()), np.argwhere(target[i].numpy())
        expected.append(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]))
    assert out["hausdorff"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert out["hausdorff-images"] == 2 and out["hausdorff-undefined"] == 1
