"""Decisions, not only rankings: a majority-class collapse visible in every metric, the threshold chosen
from the sites' rounded confusion fractions equal to the one the pooled raw scores give."""

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn import metrics as skm

from common import decision, metrics
from common.protocol import EVALUATE_SCHEMA
from common.site_policy import SitePolicy
from server.strategies import aggregate_metrics
from server.validation import Rejected, check_fields


def _site(rng: np.random.Generator, n: int, shift: float, prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores that rank well but all sit below 0.5, as a DP-collapsed model's do."""
    labels = (rng.random(n) < prevalence).astype(np.int64)
    p1 = np.clip(0.30 + shift + 0.08 * labels + rng.normal(0, 0.04, n), 0.001, 0.499)
    return labels, np.stack([1 - p1, p1], axis=1).astype(np.float32)


def _reply(labels: np.ndarray, probs: np.ndarray, policy: SitePolicy) -> dict:
    """What a site sends: accuracy and the confusion grid, rounded by its policy."""
    return policy.rounded({"num-examples": len(labels), "site-weight": 1,
                           "accuracy": metrics.accuracy(labels, probs), **decision.confusion_rates(labels, probs)})


def test_a_model_calling_one_class_reads_balanced_accuracy_one_half():
    labels = np.array([0] * 70 + [1] * 30)
    rng = np.random.default_rng(0)
    p1 = np.sort(rng.uniform(0.05, 0.45, 100))  # ranks perfectly (AUC 1) and never reaches 0.5
    p1 = np.concatenate([p1[:70], p1[70:]])
    probs = np.stack([1 - p1, p1], axis=1)
    summary = metrics.classification_summary(labels, probs)
    assert summary["accuracy"] == pytest.approx(0.7) and summary["auc"] == 1.0
    assert (summary["balanced-accuracy"], summary["sensitivity"], summary["specificity"]) == (0.5, 0.0, 1.0)
    always_one = metrics.classification_summary(labels, probs[:, ::-1].copy())  # every image called positive
    assert (always_one["balanced-accuracy"], always_one["sensitivity"], always_one["specificity"]) == (0.5, 1.0, 0.0)
    # the same from the site's confusion grid, summarised as the server summarises the federation's
    pooled = decision.summarise({"num-examples": 100, **decision.confusion_rates(labels, probs)})
    assert (pooled["balanced-accuracy"], pooled["sensitivity"], pooled["specificity"]) == (0.5, 0.0, 1.0)
    assert pooled["threshold-balanced-accuracy"] == 1.0  # the ranking was there: a threshold finds it
    assert not set(pooled) & decision.RATE_KEYS  # the grid itself does not reach the report


def test_more_classes_use_argmax_and_macro_averages():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.tile([0.6, 0.3, 0.1], (6, 1))  # always class 0
    summary = metrics.classification_summary(labels, probs, threshold=0.01)  # no meaning for 3 classes
    assert summary["accuracy"] == pytest.approx(1 / 3)
    assert summary["balanced-accuracy"] == pytest.approx(1 / 3) == summary["sensitivity"]
    assert summary["specificity"] == pytest.approx((0 + 1 + 1) / 3)


def test_binary_summary_matches_scikit_learn_at_a_threshold():
    rng = np.random.default_rng(1)
    labels, probs = _site(rng, 200, 0.0, 0.3)
    for t in (0.3, 0.35, 0.5):
        pred = (probs[:, 1] >= t).astype(int)
        summary = metrics.classification_summary(labels, probs, threshold=t)
        assert summary["balanced-accuracy"] == skm.balanced_accuracy_score(labels, pred)
        assert summary["sensitivity"] == skm.recall_score(labels, pred)
        assert summary["specificity"] == skm.recall_score(labels, pred, pos_label=0)
        assert summary["accuracy"] == skm.accuracy_score(labels, pred)


def test_threshold_from_the_sites_rounded_fractions_equals_the_pooled_raw_scores():
    rng = np.random.default_rng(2)
    policy = SitePolicy()  # metric-decimals 3, as a site rounds its reply
    sites = [_site(rng, n, shift, prevalence)
             for n, shift, prevalence in ((90, 0.0, 0.3), (150, 0.03, 0.2), (60, -0.02, 0.5), (300, 0.01, 0.25),
                                          (700, 0.0, 0.35), (980, 0.02, 0.3))]
    replies = [_reply(labels, probs, policy) for labels, probs in sites]
    for reply in replies:
        check_fields(reply, EVALUATE_SCHEMA)  # within the reply schema, every key and range
    aggregated = dict(aggregate_metrics([RecordDict({"metrics": MetricRecord(r)}) for r in replies]))
    federation = decision.summarise(aggregated, decision.total(replies))

    labels = np.concatenate([s[0] for s in sites])
    probs = np.concatenate([s[1] for s in sites])
    raw = decision.counts(labels, probs)
    assert decision.total(replies) == raw  # every count recovered exactly from the rounded fractions
    assert federation["threshold"] == decision.choose(raw) != decision.DEFAULT
    # ... which is the grid's best balanced accuracy on the pooled raw scores, by scikit-learn
    grid = {t: skm.balanced_accuracy_score(labels, (probs[:, 1] >= t).astype(int)) for t in decision.THRESHOLDS}
    assert federation["threshold-balanced-accuracy"] == pytest.approx(max(grid.values()), abs=1e-12)
    assert grid[federation["threshold"]] == pytest.approx(max(grid.values()), abs=1e-12)
    at_half = metrics.classification_summary(labels, probs)
    for key in ("balanced-accuracy", "sensitivity", "specificity"):
        assert federation[key] == pytest.approx(at_half[key], abs=1e-12)


def test_tied_thresholds_take_the_middle_and_one_class_gives_none():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])
    c = decision.counts(labels, probs)
    # every threshold in (0.2, 0.7] separates perfectly, 0.5 among them: the default stays
    assert decision.choose(c) == 0.5
    shifted = decision.counts(labels, np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]))
    tied = [t for t in decision.THRESHOLDS if 0.2 < t <= 0.3]  # these separate
    assert len(tied) > 2 and decision.choose(shifted) == tied[(len(tied) - 1) // 2]  # the middle one (lower)
    # nothing beats 0.5 (every image gets the same score): 0.5 stays, not the middle of the tie
    flat = decision.counts(labels, np.tile([0.7, 0.3], (4, 1)))
    assert decision.choose(flat) == 0.5
    assert decision.choose(decision.counts(np.zeros(4, dtype=int), probs)) is None


def test_the_schema_refuses_a_fraction_outside_zero_one():
    labels, probs = _site(np.random.default_rng(3), 50, 0.0, 0.3)
    reply = _reply(labels, probs, SitePolicy())
    check_fields(reply, EVALUATE_SCHEMA)
    with pytest.raises(Rejected, match="outside"):
        check_fields({**reply, decision.tp_key(decision.THRESHOLDS[50]): 1.5}, EVALUATE_SCHEMA)


def test_every_site_sends_the_same_keys_whatever_its_split_holds():
    """Two classes: the grid (not the site's own sensitivity, undefined without positives); more
    classes: the site's macro values; an empty split: the same keys at zero weight. All in the schema."""
    from common import scores
    from common.training import Evaluation

    labels, probs = _site(np.random.default_rng(5), 30, 0.0, 0.3)
    binary = Evaluation(30, 0.6, metrics.classification_summary(labels, probs), decision.confusion_rates(labels, probs))
    sent = scores.reply(binary, "classification", 2)
    empty = scores.reply(Evaluation(0, float("nan")), "classification", 2)
    assert set(sent) == set(empty) == {"loss", "accuracy", "auc", "auc-weight", *decision.KEYS}
    assert empty["auc-weight"] == 0 and not any(empty[k] for k in decision.KEYS)
    three = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    multi = Evaluation(3, 0.4, metrics.classification_summary(np.array([0, 1, 1]), three))
    sent3 = scores.reply(multi, "classification", 3)
    assert set(sent3) == set(scores.reply(Evaluation(0, float("nan")), "classification", 3)) == \
        {"loss", "accuracy", "auc", "auc-weight", "balanced-accuracy", "sensitivity", "specificity"}
    assert sent3["auc-weight"] == 0  # a class missing: AUC undefined, sent at zero weight
    for reply in (sent, empty, sent3):
        check_fields({"num-examples": 0, "site-weight": 1, **SitePolicy().rounded(reply)}, EVALUATE_SCHEMA)
