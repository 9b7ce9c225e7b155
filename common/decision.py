"""The decision, not only the ranking: a two-class model's threshold, chosen from the federation's validation.

A model that ranks well (AUC 0.79) can still call every image negative at 0.5 when DP-SGD has pulled its
scores toward the majority class. The threshold that balances sensitivity and specificity is found from
the sites' held-out splits without any score leaving a site: each site sends, for every threshold of a
fixed grid (`THRESHOLDS`), the fraction of its validation images that are true positives and false
positives there, and the fraction that are positive (`confusion_rates`), as rounded aggregates within the
reply schema (common/protocol.py). The server sums each site's whole counts, `round(fraction x images)`
(`pooled`, `total`), and chooses the threshold of the highest balanced accuracy (Youden's J) over the
pooled counts (`choose`): the one the pooled raw scores would give, on the grid. It goes into the model
card, and `fedhosp predict` decides with it.

Two classes only: a prediction is positive when the score of class 1 is at least the threshold (0.5 is
argmax, but for exact ties). More classes: argmax, no threshold, and the sites send their own macro
balanced accuracy, sensitivity and specificity (a mean over sites, not a pooled value).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

DEFAULT = 0.5
LOGIT_STEP, LOGIT_MAX = 0.1, 6.0


def _grid() -> tuple[float, ...]:
    """Evenly spaced in log-odds, -6 .. 6 by 0.1 (p 0.0025 .. 0.9975, 121 thresholds, 0.5 among them), to
    4 significant digits: a collapsed model's scores sit in a narrow band near 0 or 1 (measured: all in
    0.015-0.047), where a grid even in probability (0.01, 0.02, ...) has two or three points."""
    steps = round(LOGIT_MAX / LOGIT_STEP)
    return tuple(float(f"{1 / (1 + math.exp(-k * LOGIT_STEP)):.4g}") for k in range(-steps, steps + 1))


THRESHOLDS = _grid()
POSITIVES = "positives"  # fraction of the validation images that are class 1


def tp_key(t: float) -> str:
    return f"tp@{t:g}"


def fp_key(t: float) -> str:
    return f"fp@{t:g}"


KEYS = (POSITIVES, *(tp_key(t) for t in THRESHOLDS), *(fp_key(t) for t in THRESHOLDS))
RATE_KEYS = frozenset(KEYS)


def predict(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class per row: two classes, class 1 where its probability is >= `threshold` (0.5 unless set);
    more classes, argmax (a threshold has no meaning there)."""
    probs = np.asarray(probs)
    if probs.shape[1] == 2:
        return (probs[:, 1] >= (DEFAULT if threshold is None else threshold)).astype(np.int64)
    return probs.argmax(axis=1)


def counts(labels: np.ndarray, probs: np.ndarray) -> dict[str, int]:
    """Whole counts over one set: positives, and TP and FP at every grid threshold (plus `images`)."""
    labels, score = np.asarray(labels), np.asarray(probs)[:, 1]
    positive = labels == 1
    out = {POSITIVES: int(positive.sum())}
    for t in THRESHOLDS:
        called = score >= t
        out[tp_key(t)] = int((called & positive).sum())
        out[fp_key(t)] = int((called & ~positive).sum())
    return out | {"images": len(labels)}


def confusion_rates(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """A site's part: `counts` as fractions of its validation images (what its reply may carry)."""
    c, n = counts(labels, probs), len(labels)
    return {k: c[k] / n if n else 0.0 for k in KEYS}


def pooled(rates: Mapping[str, Any], images: int) -> dict[str, int]:
    """One site's whole counts from its fractions of `images`: exact while the fractions keep enough
    decimals (metric-decimals 3 below 1,000 validation images), else the nearest count."""
    return {k: round(float(rates[k]) * images) for k in KEYS} | {"images": int(images)}


def total(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The federation's counts: each site's whole counts (`pooled`), summed over its replies."""
    out = dict.fromkeys((*KEYS, "images"), 0)
    for m in records:
        if POSITIVES in m:
            for k, v in pooled(m, int(m["num-examples"])).items():
                out[k] += v
    return out


def at(c: Mapping[str, int], t: float) -> dict[str, float]:
    """Sensitivity, specificity and balanced accuracy at grid threshold `t`; a class absent: left out."""
    pos, neg = c[POSITIVES], c["images"] - c[POSITIVES]
    tp, fp = c[tp_key(t)], c[fp_key(t)]
    out: dict[str, float] = {}
    if pos:
        out["sensitivity"] = tp / pos
    if neg:
        out["specificity"] = (neg - fp) / neg
    if pos and neg:
        out["balanced-accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
    return out


def choose(c: Mapping[str, int]) -> float | None:
    """The grid threshold of the highest balanced accuracy (integer arithmetic: ties are exact): 0.5 if
    it is among the best (no threshold does better than the default), else the middle of the tied
    ones; None when the pooled set lacks a class."""
    pos, neg = c[POSITIVES], c["images"] - c[POSITIVES]
    if not pos or not neg:
        return None
    # balanced accuracy x 2·pos·neg, an integer: tp·neg + (neg - fp)·pos
    score = [c[tp_key(t)] * neg + (neg - c[fp_key(t)]) * pos for t in THRESHOLDS]
    best = max(score)
    tied = [t for t, s in zip(THRESHOLDS, score, strict=True) if s == best]
    return DEFAULT if DEFAULT in tied else tied[(len(tied) - 1) // 2]


def inconsistent(metrics: Mapping[str, Any]) -> str:
    """Why a reply's grid cannot be a confusion grid ("" if it can): all its keys or none, TP at most the
    positives and FP at most the negatives, both non-increasing as the threshold rises (rounding keeps
    all of this, so only a broken or lying site fails it)."""
    present = RATE_KEYS & set(metrics)
    if not present:
        return ""
    if present != RATE_KEYS:
        return f"the confusion grid lacks {len(RATE_KEYS - present)} of its {len(RATE_KEYS)} keys"
    pos = float(metrics[POSITIVES])
    for key, cap in ((tp_key, pos), (fp_key, 1 - pos)):
        values = [float(metrics[key(t)]) for t in THRESHOLDS]
        if any(v > cap + 1e-9 for v in values) or any(b > a + 1e-9 for a, b in itertools.pairwise(values)):
            return f"{key(THRESHOLDS[0])[:2]}@t is not a confusion count: above its class's share or rising with t"
    return ""


def summarise(metrics: Mapping[str, Any], c: Mapping[str, int] | None = None) -> dict[str, Any]:
    """An evaluate record (one site's, or the aggregate with the sites' counts `c` from `total`) with
    the grid replaced by what a reader needs: sensitivity, specificity and balanced accuracy at 0.5,
    the chosen `threshold` and the same three there (`threshold-*`). A record without the grid (more
    classes, segmentation) is returned as it is."""
    if POSITIVES not in metrics:
        return dict(metrics)
    out = {k: v for k, v in metrics.items() if k not in RATE_KEYS}
    c = c if c is not None else pooled(metrics, int(metrics.get("num-examples", 0)))
    out.update(at(c, DEFAULT))
    threshold = choose(c)
    if threshold is not None:
        out["threshold"] = threshold
        out.update({f"threshold-{k}": v for k, v in at(c, threshold).items()})
    return out
