import pytest
from flwr.app import MetricRecord, RecordDict

from common.config import RunConfig
from common.errors import ConfigError
from server.app import RoundResult, progress_line
from server.strategies import aggregate_metrics, build_strategy


def _reply(**metrics):
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_metrics_are_example_weighted_and_epsilon_is_the_worst_site():
    replies = [
        _reply(**{"num-examples": 100, "accuracy": 0.9, "epsilon": 2.0, "auc": 0.8, "auc-weight": 100}),
        _reply(**{"num-examples": 300, "accuracy": 0.5, "epsilon": 5.0, "auc": 0.0, "auc-weight": 0}),
    ]
    out = aggregate_metrics(replies, "num-examples")
    assert out["num-examples"] == 400 and out["sites"] == 2
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["epsilon-max"] == 5.0 and "epsilon" not in out
    assert out["auc"] == pytest.approx(0.8)  # the single-class site does not drag AUC to 0


def test_unknown_strategy_is_refused():
    assert build_strategy(RunConfig()).__class__.__name__ == "FedAvg"
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig.from_mapping({"strategy": "fedsgd"})


def test_progress_line_has_round_metrics_and_eta():
    result = RoundResult(2, train={"epsilon-max": 3.5}, evaluate={"loss": 0.5, "accuracy": 0.8, "auc": 0.9},
                         sites_ok=3, sites_failed=1)
    line = progress_line(result, rounds=4, elapsed=10.0)
    assert line.startswith("round 2/4") and "acc 0.800" in line and "eps_max 3.50" in line
    assert "sites 3/4" in line and "eta 10s" in line
