"""One server round against an in-memory grid: refusals, failures and client-level DP."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.flower_compat.engine import acting_as
from common.protocol import BUDGET_SPENT, POLICY_REFUSED, REFUSED_SETTING, STATUS
from server.app import BudgetsSpent, play_round
from server.strategies import build_strategy

SHAPE = (200, 50)  # 10,000 coordinates: enough for a noise std estimate


class Grid:
    """The two calls our round makes; each node answers with `behaviour(node_id, message)`."""

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            with acting_as(1, m.metadata.dst_node_id):  # the reply is stamped as coming from it
                replies.append(Message(self.behaviour(m.metadata.dst_node_id, m), reply_to=m))
        return replies


def _update(delta, examples):
    def behaviour(node, msg):
        if msg.metadata.message_type.startswith("evaluate"):
            return RecordDict({"metrics": MetricRecord({"num-examples": 10, "site-weight": 1, "loss": 1.0,
                                                            "accuracy": 0.5})})
        w = msg.content["arrays"]["w"].numpy() + delta[node]
        metrics = {"num-examples": examples[node], "site-weight": 1, "train-loss": 0.5, "epsilon": float(node)}
        return RecordDict({"arrays": _record(w), "metrics": MetricRecord(metrics)})
    return behaviour


def _record(w):
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float64))})


def _refuse(node, msg, inner):
    if node == 3 and msg.metadata.message_type.startswith("train"):
        return RecordDict({STATUS: ConfigRecord({STATUS: BUDGET_SPENT, "epsilon-total": 7.9,
                                                 "privacy-budget": 8.0, "epsilon-next": 8.4})})
    return inner(node, msg)


def _round(cfg, behaviour):
    start = _record(np.zeros(SHAPE))
    arrays, result = play_round(Grid(behaviour), build_strategy(cfg), start, cfg, 1)
    return arrays["w"].numpy(), result


CFG = RunConfig(min_available_sites=3)
DELTAS = {1: np.full(SHAPE, 1.0), 2: np.full(SHAPE, 3.0), 3: np.full(SHAPE, 100.0)}


def test_a_refusing_site_is_left_out_logged_and_counted():
    w, result = _round(CFG, lambda n, m: _refuse(n, m, _update(DELTAS, {1: 100, 2: 300, 3: 50})))
    assert np.allclose(w, (1.0 * 100 + 3.0 * 300) / 400)  # FedAvg of the two that trained
    assert result.sites_ok == 2 and result.sites_failed == 0
    assert result.refused == [{"node": 3, STATUS: BUDGET_SPENT, "epsilon-total": 7.9, "privacy-budget": 8.0,
                               "epsilon-next": 8.4}]
    assert sorted(s["node"] for s in result.sites) == [1, 2]
    assert result.to_json()["sites_refused"] == 1


def test_a_site_whose_policy_refuses_the_run_is_a_refusal_in_train_and_evaluate_not_a_rejection():
    """The site's own policy (common/site_policy.py) declines: the server's schema knows the status."""
    def policy(node, msg):
        if node == 3:
            return RecordDict({STATUS: ConfigRecord({STATUS: POLICY_REFUSED, REFUSED_SETTING: "image-size"})})
        return _update(DELTAS, {1: 100, 2: 300, 3: 50})(node, msg)

    w, result = _round(CFG, policy)
    assert np.allclose(w, (1.0 * 100 + 3.0 * 300) / 400)
    assert result.refused == [{"node": 3, STATUS: POLICY_REFUSED, REFUSED_SETTING: "image-size"}]
    assert result.rejected == []  # its evaluate refusal too is a refusal, not a malformed reply
    assert sorted(s["node"] for s in result.site_scores) == [1, 2]


def test_when_every_site_refuses_the_run_stops_with_the_reason():
    def all_refuse(node, msg):
        return _refuse(3, msg, _update(DELTAS, {1: 1, 2: 1, 3: 1}))

    with pytest.raises(BudgetsSpent, match="every site refused"):
        _round(CFG, all_refuse)


def test_client_level_dp_clips_each_site_and_averages_uniformly():
    cfg = RunConfig(min_available_sites=3, client_dp="fixed", client_dp_clipping_norm=1.0,
                    client_dp_noise_multiplier=1e-12)  # (practically) no noise: check the clipping
    w, result = _round(cfg, _update(DELTAS, {1: 100, 2: 300, 3: 50}))
    # every update has norm >> 1, so each is scaled to norm 1; the mean ignores example counts
    per_site = [d / np.linalg.norm(d) for d in DELTAS.values()]
    assert np.allclose(w, np.mean(per_site, axis=0), atol=1e-9)
    assert result.train["client-epsilon"] > 0


def test_client_level_dp_noise_has_the_calibrated_std():
    np.random.seed(7)  # Flower's wrapper draws from numpy's global generator
    sigma, clip = 0.8, 2.0
    cfg = RunConfig(min_available_sites=3, client_dp="fixed", client_dp_clipping_norm=clip,
                    client_dp_noise_multiplier=sigma)
    zero = {n: np.full(SHAPE, 1e-12) for n in (1, 2, 3)}  # (Flower's clip divides by the norm)
    w, _ = _round(cfg, _update(zero, {1: 1, 2: 1, 3: 1}))
    expected = sigma * clip / 3  # Gaussian mechanism on the mean of 3 clipped updates
    assert w.std() == pytest.approx(expected, rel=5 / np.sqrt(2 * w.size))


def test_a_run_whose_sites_all_run_out_of_budget_ends_cleanly_with_model_and_report(tmp_path):
    from common.flower_compat import packing
    from server import checkpoint, runlog
    from server.app import run
    from server.assembly import compose
    from simulation import report
    from simulation.inprocess import InProcessGrid

    def behaviour(node, msg):
        metrics = MetricRecord({"num-examples": 10, "site-weight": 1, "loss": 1.0, "accuracy": 0.5, "auc": 0.5,
                                "auc-weight": 10})
        if msg.metadata.message_type.startswith("evaluate"):
            return RecordDict({"metrics": metrics})
        if msg.content["config"]["server-round"] >= 2:
            return _refuse(3, msg, None)
        train = MetricRecord({"num-examples": 10, "site-weight": 1, "train-loss": 0.5})
        return RecordDict({"arrays": msg.content["arrays"], "metrics": train})  # no change: enough here

    cfg = RunConfig(min_available_sites=3, num_server_rounds=4, out_dir=str(tmp_path))
    sites = packing.answering_in_kind(lambda msg, context: Message(behaviour(context.node_id, msg), reply_to=msg))
    path = run(compose(InProcessGrid(3, client_app=sites), cfg), cfg, "r1")
    assert checkpoint.load(path)["round"] == 1
    assert [r["round"] for r in runlog.read(tmp_path / runlog.RUN_LOG)] == [1]
    results = json.loads(report.write(tmp_path, cfg.to_mapping(), 3).read_text())
    assert "every site refused" in results["stopped"]
    assert [r["round"] for r in results["privacy"]["refused"]] == [2, 2, 2]
    assert "3 site-round(s) refused" in report.final_line(tmp_path / "results.json")
