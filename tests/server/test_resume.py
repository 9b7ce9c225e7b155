"""Checkpoint/resume and the minimum-sites deadline, through server/app.py `run()` on an in-memory grid."""

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.errors import ConfigError
from common.flower_compat import engine, packing
from server import checkpoint, resume
from server.app import run as run_server
from server.assembly import compose
from server.strategies import build_strategy
from server.waiting import SitesUnavailable, WaitingGrid
from simulation.inprocess import InProcessGrid


class Stopped(BaseException):
    """The coordinator going down mid-run (not a site's failure, which the engine would report as an error)."""


class Sites:
    """Sites that shift every weight by a node- and round-dependent amount; records what they were sent."""

    def __init__(self, sites=2, stop_at_round=None):
        self.sites, self.stop_at_round = sites, stop_at_round
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # round -> weights the sites received to train
        self.names: dict[int, str] = {}  # round -> the run's name in the sites' ledgers
        self.answer = packing.answering_in_kind(self._answer)

    def _answer(self, m, context):
        server_round = int(m.content["config"]["server-round"])
        kind = m.metadata.message_type
        if kind.startswith("train") and server_round == self.stop_at_round:
            raise Stopped
        node = context.node_id
        arrays = m.content["arrays"]
        if kind.startswith("train"):
            self.sent[server_round] = {k: v.numpy().copy() for k, v in arrays.items()}
            self.names[server_round] = str(m.content["config"]["run-name"])
            shifted = {k: torch.from_numpy(v.numpy() + 0.01 * node * server_round) for k, v in arrays.items()}
            content = RecordDict({"arrays": ArrayRecord(torch_state_dict=shifted), "metrics": MetricRecord(
                {"num-examples": 10 * node, "site-weight": 1, "train-loss": 0.5})})
        else:
            content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "site-weight": 1, "loss": 1.0})})
        return Message(content, reply_to=m)


def run(sites, cfg, run_id):
    """The ServerApp's loop over the assembled grid, against `sites` in this process."""
    with engine.acting_as(int(run_id), 0):
        return run_server(compose(InProcessGrid(sites.sites, int(run_id), client_app=sites.answer), cfg), cfg, run_id)


def _cfg(tmp_path, **kw):
    base = dict(num_server_rounds=3, dp_enabled=False, out_dir=str(tmp_path), validate_updates=False,
                min_available_sites=2)
    return RunConfig(**{**base, **kw})


def test_resume_continues_at_the_next_round_from_the_checkpointed_weights(tmp_path):
    straight = Sites()
    run(straight, _cfg(tmp_path / "straight"), "1")

    stopped = Sites(stop_at_round=3)
    with pytest.raises(Stopped):
        run(stopped, _cfg(tmp_path / "resumed"), "2")
    saved = checkpoint.load(tmp_path / "resumed" / checkpoint.LAST)
    assert saved["round"] == 2

    again = Sites()
    model = run(again, _cfg(tmp_path / "resumed", resume=True), "3")

    assert sorted(again.sent) == [3]  # rounds 1 and 2 are not trained again
    for key, value in again.sent[3].items():  # round 3 starts from exactly the round-2 checkpoint ...
        assert np.array_equal(value, saved["state_dict"][key].numpy())
        assert np.array_equal(value, straight.sent[3][key])  # ... which is where the uninterrupted run was
    final, reference = checkpoint.load(model), checkpoint.load(tmp_path / "straight" / checkpoint.MODEL)
    assert final["round"] == 3
    for key in reference["state_dict"]:
        assert torch.equal(final["state_dict"][key], reference["state_dict"][key])
    rounds = [r["round"] for r in _runlog(tmp_path / "resumed")]
    assert rounds == [1, 2, 3]
    # the sites' ledgers see one run across the restart, so its ε keeps adding up
    assert stopped.names == {1: "2", 2: "2"} and again.names == {3: "2"} and straight.names[3] == "1"


def test_resume_refuses_a_finished_run_a_missing_checkpoint_and_other_settings(tmp_path):
    run(Sites(), _cfg(tmp_path, num_server_rounds=1), "1")
    with pytest.raises(ConfigError, match="finished"):
        run(Sites(), _cfg(tmp_path, num_server_rounds=1, resume=True), "2")
    with pytest.raises(ConfigError, match="image-size was 32"):
        run(Sites(), _cfg(tmp_path, num_server_rounds=2, resume=True, image_size=64), "3")
    with pytest.raises(ConfigError, match=r"no .*checkpoint-last\.pt"):
        run(Sites(), _cfg(tmp_path / "empty", resume=True), "4")


def test_strategy_state_survives_a_restart(tmp_path):
    cfg = _cfg(tmp_path, client_dp="adaptive", min_available_sites=40)  # enough sites for its count noise
    strategy = build_strategy(cfg)
    strategy.clipping_norm = 0.4321  # adaptive clipping's norm moves every round
    inner = strategy.strategy
    inner.m_t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}  # as FedAdam/FedYogi keep their moments
    resume.save_strategy(tmp_path, strategy, 2)

    fresh = build_strategy(cfg)
    resume._load_strategy(tmp_path, fresh, 2)
    assert fresh.clipping_norm == 0.4321
    assert np.array_equal(fresh.strategy.m_t["w"], inner.m_t["w"]) and fresh.strategy.m_t["w"].dtype == np.float32
    with pytest.raises(ConfigError, match="from round 2 but the checkpoint from round 3"):
        resume._load_strategy(tmp_path, build_strategy(cfg), 3)


def test_a_server_short_of_sites_gives_up_after_site_wait(tmp_path):
    started = time.monotonic()
    with pytest.raises(SitesUnavailable, match=r"only 1 of the 2 sites needed .* within 1\.5s"):
        run(Sites(sites=1), _cfg(tmp_path, site_wait=1.5), "1")
    assert time.monotonic() - started < 30


def test_waiting_grid_resets_its_clock_when_enough_sites_are_back():
    now = [0.0]
    nodes = [[1], [1], [1, 2], [1], [1]]
    inner = type("G", (), {"get_node_ids": lambda self: nodes.pop(0)})()
    grid = WaitingGrid(inner, minimum=2, wait=10, clock=lambda: now[0])
    assert grid.get_node_ids() == [1]  # the clock starts
    now[0] = 9
    assert grid.get_node_ids() == [1]
    assert grid.get_node_ids() == [1, 2]  # enough: the clock stops
    now[0] = 15
    assert grid.get_node_ids() == [1]  # short again: a fresh 10 s
    now[0] = 26
    with pytest.raises(SitesUnavailable):
        grid.get_node_ids()


@pytest.mark.parametrize("wait_first", [True, False])
def test_a_site_that_connects_while_the_round_waits_for_it_is_sampled(tmp_path, wait_first):
    """Flower's FedAvg sizes its sample from the node count before it waits for min_available_nodes:
    without the server's own wait first, the third hospital connects during that wait and sits out."""
    calls = []

    class Connecting:
        def get_node_ids(self):
            calls.append(None)
            return [1, 2, 3] if len(calls) > 2 else [1, 2]

    grid = WaitingGrid(Connecting(), minimum=3, wait=60)
    strategy = build_strategy(_cfg(tmp_path, min_available_sites=3))
    if wait_first:
        assert grid.wait_for_sites(sleep=lambda _s: None) == [1, 2, 3]
    arrays = ArrayRecord(torch_state_dict={"w": torch.zeros(2)})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert len(sent) == (3 if wait_first else 2)


def _runlog(out):
    from server import runlog

    return runlog.read(out / runlog.RUN_LOG)
