"""Flower's strategies really keep their between-round state where strategy_state.py looks for it.

One round of each stateful strategy, through Flower's own configure/aggregate calls: the
attributes it names must exist and change. A rename upstream fails here, not as a resumed
run that silently restarts its moments (tests/server/test_resume.py shows the round trip).
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.flower_compat import engine, strategy_state
from server.strategies import UNIFORM_KEY, WEIGHT_KEY, build_strategy
from simulation.inprocess import InProcessGrid

SITES = 3
START = ArrayRecord({"w": Array(np.full((2, 3), 0.5, np.float32)), "b": Array(np.ones(3, np.float32))})


def _site(msg: Message, context) -> Message:
    """Each site moves every weight by its node id and reports its size."""
    moved = ArrayRecord({k: Array(a.numpy() + context.node_id) for k, a in msg.content["arrays"].items()})
    metrics = MetricRecord({WEIGHT_KEY: 10 * context.node_id, UNIFORM_KEY: 1})
    return Message(RecordDict({"arrays": moved, "metrics": metrics}), reply_to=msg)


def _one_round(settings: dict) -> tuple[list[dict], list[dict]]:
    """The state before and after one round of the strategy `settings` build."""
    strategy = build_strategy(RunConfig.from_mapping({"min-available-sites": SITES, **settings}))
    grid = InProcessGrid(SITES, client_app=_site)
    before = strategy_state.capture(strategy)
    with engine.acting_as(1, 0):
        messages = list(strategy.configure_train(1, START, ConfigRecord({}), grid))
        replies = list(grid.send_and_receive(messages))
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return before, strategy_state.capture(strategy)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_keep_their_moments_and_model_where_we_save_them(name):
    _, after = _one_round({"strategy": name})
    state = after[0]
    moments = {"m_t", "v_t"}  # (FedAdagrad keeps an m_t too)
    assert set(state) == moments | {"current_arrays"}
    for attr in moments:
        assert set(state[attr]) == set(START.keys()), attr
        assert all(float(v.abs().sum()) > 0 for v in state[attr].values()), attr  # moved by the round
    # the model this round's update is taken against: what the next round's update is computed from
    assert {k: v.numpy().tolist() for k, v in state["current_arrays"].items()} == {
        k: a.numpy().tolist() for k, a in START.items()}


def test_adaptive_client_dp_keeps_its_clipping_norm_where_we_save_it():
    settings = {"strategy": "fedavg", "client-dp": "adaptive", "client-dp-noise-multiplier": 0.1,
                "client-dp-clipping-norm": 0.5}
    before, after = _one_round(settings)
    wrapped = strategy_state.layers(build_strategy(RunConfig.from_mapping({"min-available-sites": SITES, **settings})))
    assert [type(s).__name__ for s in wrapped] == ["DifferentialPrivacyServerSideAdaptiveClipping", "FedAvg"]
    assert before[0]["clipping_norm"] == 0.5
    assert after[0]["clipping_norm"] != 0.5  # every update was above the norm: it grows
