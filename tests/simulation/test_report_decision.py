"""The simulation's report shows a majority-class collapse at a glance: balanced accuracy, sensitivity and
specificity beside accuracy and AUC in rounds.csv, results.json and the `--baselines` table, and the test
split scored at the threshold the sites' validation chose."""

import csv
import json

import numpy as np
import pytest

from common import decision, metrics
from server import runlog
from server.app import RoundResult
from simulation import report

COLLAPSED = {"loss": 0.6, "accuracy": 0.73, "balanced-accuracy": 0.5, "sensitivity": 0.0, "specificity": 1.0,
             "auc": 0.79, "threshold": 0.4256, "threshold-balanced-accuracy": 0.71, "threshold-sensitivity": 0.7,
             "threshold-specificity": 0.72, "num-examples": 100}


def _test_split() -> dict:
    rng = np.random.default_rng(0)
    labels = (rng.random(156) < 0.27).astype(np.int64)
    p1 = np.clip(0.38 + 0.08 * labels + rng.normal(0, 0.04, 156), 0.01, 0.49)
    probs = np.stack([1 - p1, p1], axis=1)
    summary = metrics.classification_summary(labels, probs)
    return {"num-examples": 156, "loss": 0.6, **summary, "counts": decision.counts(labels, probs),
            "_labels": labels, "_probs": probs}


def test_rounds_results_and_table_show_the_collapse(tmp_path):
    test = _test_split()
    runlog.start(tmp_path / runlog.RUN_LOG)
    runlog.append(tmp_path / runlog.RUN_LOG, RoundResult(1, evaluate=COLLAPSED, sites_ok=3).to_json())
    (tmp_path / report.CENTRAL).write_text(json.dumps({"round": 1, **{k: v for k, v in test.items()
                                                                       if not k.startswith("_")}}) + "\n")
    path = report.write(tmp_path, {"task": "classification", "strategy": "fedavg"}, sites=3)
    final = json.loads(path.read_text())["final"]
    assert (final["balanced-accuracy"], final["sensitivity"], final["specificity"]) == (0.5, 0.0, 1.0)
    assert (final["test_balanced-accuracy"], final["test_sensitivity"], final["test_specificity"]) == (0.5, 0.0, 1.0)
    # the test split at the sites' threshold, exactly what its raw scores give there
    at = metrics.classification_summary(test["_labels"], test["_probs"], COLLAPSED["threshold"])
    assert final["test_threshold-balanced-accuracy"] == pytest.approx(at["balanced-accuracy"], abs=1e-12)
    with open(tmp_path / report.ROUNDS_CSV, newline="") as f:
        row = next(csv.DictReader(f))
    assert (row["balanced-accuracy"], row["sensitivity"], row["specificity"]) == ("0.5", "0.0", "1.0")
    assert row["threshold"] == "0.4256" and row["test_balanced-accuracy"] == "0.5"

    results = json.loads(path.read_text())
    results["baselines"] = {
        "pooled": {"sites": {"accuracy": 0.73, "balanced-accuracy": 0.5, "sensitivity": 0.0, "specificity": 1.0,
                             "auc": 0.8}, "per-site": [{"accuracy": 0.7}], "test": None, "epsilon": 8.0},
    }
    table = report.summary_table(results)
    head, federated, pooled = table[0].split(), table[1], table[2]
    assert head[:4] == ["test", "acc", "test", "bacc"] and "sens" in head and "spec" in head
    assert "0.500" in federated and "0.000" in federated and "1.000" in federated
    assert pooled.split()[-7:-2] == ["0.730", "0.500", "0.000", "1.000", "0.800"]
    assert "at threshold 0.426" in table[-1] and "bacc 0.710" in table[-1]


def test_baselines_pool_the_sites_confusion_grids_as_the_server_does():
    from common.site_policy import SitePolicy
    from simulation import baselines

    rng = np.random.default_rng(4)
    sites = []
    for n in (40, 70, 25):
        labels = (rng.random(n) < 0.3).astype(np.int64)
        p1 = np.clip(0.3 + 0.1 * labels + rng.normal(0, 0.03, n), 0.01, 0.49)
        sites.append((labels, np.stack([1 - p1, p1], axis=1)))
    replies = [SitePolicy().rounded({"num-examples": len(y), "site-weight": 1, "loss": 0.5,
                                     "accuracy": metrics.accuracy(y, p), "auc": 0.8, "auc-weight": len(y),
                                     **decision.confusion_rates(y, p)}) for y, p in sites]
    pooled = baselines.pooled_scores(replies)
    labels, probs = np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites])
    assert (pooled["balanced-accuracy"], pooled["sensitivity"], pooled["specificity"]) == (0.5, 0.0, 1.0)
    assert pooled["threshold"] == decision.choose(decision.counts(labels, probs))
    shown = baselines._shown(replies[0])
    assert shown["balanced-accuracy"] == 0.5 and not set(shown) & decision.RATE_KEYS
