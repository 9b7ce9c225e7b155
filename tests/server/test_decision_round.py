"""A round's evaluation as the server reports it: the sites' confusion grids pooled into balanced accuracy,
sensitivity, specificity and a threshold, a collapse visible in the round's line, the threshold in the card."""

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from common import decision, metrics
from common.config import RunConfig
from common.site_policy import SitePolicy
from server import checkpoint
from server.app import RoundResult, play_round, progress_line
from server.strategies import build_strategy
from tests.server.test_round import Grid, _record, _update

SHAPE = (4, 3)


def _collapsed(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores that rank (positives higher) but never reach 0.5: every image called negative at 0.5."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    p1 = np.clip(0.3 + 0.1 * labels + rng.normal(0, 0.03, n), 0.01, 0.49)
    return labels, np.stack([1 - p1, p1], axis=1)


SITES = {1: _collapsed(1, 40), 2: _collapsed(2, 90), 3: _collapsed(3, 25)}


def _evaluating(node, msg):
    if not msg.metadata.message_type.startswith("evaluate"):
        return _update({k: np.zeros(SHAPE) for k in SITES}, {k: 10 for k in SITES})(node, msg)
    labels, probs = SITES[node]
    reply = {"num-examples": len(labels), "site-weight": 1, "loss": 1.0, "accuracy": metrics.accuracy(labels, probs),
             "auc": 0.8, "auc-weight": len(labels), **decision.confusion_rates(labels, probs)}
    return RecordDict({"metrics": MetricRecord(SitePolicy().rounded(reply))})


def test_the_round_reports_the_pooled_collapse_and_the_threshold_that_undoes_it():
    cfg = RunConfig(min_available_sites=3)
    _, result = play_round(Grid(_evaluating), build_strategy(cfg), _record(np.zeros(SHAPE)), cfg, 1)
    ev = result.evaluate
    labels = np.concatenate([SITES[k][0] for k in SITES])
    probs = np.concatenate([SITES[k][1] for k in SITES])
    assert (ev["balanced-accuracy"], ev["sensitivity"], ev["specificity"]) == (0.5, 0.0, 1.0)
    assert ev["threshold"] == decision.choose(decision.counts(labels, probs))
    pooled = metrics.classification_summary(labels, probs, ev["threshold"])
    assert ev["threshold-balanced-accuracy"] == pytest.approx(pooled["balanced-accuracy"], abs=1e-12)
    assert ev["threshold-balanced-accuracy"] > 0.8
    assert not set(ev) & decision.RATE_KEYS  # the grid stays out of the run log
    for site in result.site_scores:  # each site's own view, summarised from its own grid
        assert site["balanced-accuracy"] == 0.5 and not set(site) & decision.RATE_KEYS
    line = progress_line(result, rounds=1, elapsed=1.0)
    assert "bacc 0.500" in line and "sens 0.000" in line and "spec 1.000" in line
    assert f"at {ev['threshold']:.3g}: bacc {ev['threshold-balanced-accuracy']:.3f}" in line
    card = checkpoint.model_card(cfg, [result.to_json()])
    assert card.threshold == ev["threshold"] and "probability is >=" in "\n".join(card.lines())


def test_three_classes_have_no_threshold():
    result = RoundResult(1, evaluate={"loss": 0.5, "accuracy": 0.8, "balanced-accuracy": 0.5, "sensitivity": 0.5,
                                      "specificity": 0.75, "auc": 0.9}, sites_ok=3)
    assert "bacc 0.500" in progress_line(result, rounds=2, elapsed=1.0)
    card = checkpoint.model_card(RunConfig(num_classes=3), [result.to_json()])
    assert card.threshold is None and "the most probable class" in "\n".join(card.lines())


def test_a_grid_that_is_no_confusion_grid_is_rejected_alone():
    """A site inflating its true positives at one threshold (to drag the federation's threshold) or
    sending half a grid: its evaluate reply is rejected, the others' make the round."""
    def lying(node, msg):
        reply = _evaluating(node, msg)
        if node == 2 and msg.metadata.message_type.startswith("evaluate"):
            metrics = dict(reply["metrics"])
            lower, higher = (decision.tp_key(t) for t in decision.THRESHOLDS[57:59])
            metrics[higher] = metrics[lower] + 0.1  # more true positives at a higher threshold
            reply = RecordDict({"metrics": MetricRecord(metrics)})
        if node == 3 and msg.metadata.message_type.startswith("evaluate"):
            metrics = {k: v for k, v in reply["metrics"].items() if k != decision.fp_key(decision.THRESHOLDS[50])}
            reply = RecordDict({"metrics": MetricRecord(metrics)})
        return reply

    cfg = RunConfig(min_available_sites=3)
    _, result = play_round(Grid(lying), build_strategy(cfg), _record(np.zeros(SHAPE)), cfg, 1)
    rejected = {(r["node"], r["phase"], r["class"]) for r in result.rejected}
    assert rejected == {(2, "evaluate", "schema"), (3, "evaluate", "schema")}
    assert result.evaluate["num-examples"] == len(SITES[1][0])
    labels, probs = SITES[1]
    assert result.evaluate["threshold"] == decision.choose(decision.counts(labels, probs))
