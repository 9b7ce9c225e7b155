"""SecAgg+ on our round loop (server/secagg.py + client/secagg.py), in-process, 5 sites.

The protocol tests use sites whose updates the test chose (the real site-side stage handler, no
training), so the unmasked mean can be compared with the exact weighted mean; the end-to-end tests
run the real ClientApp on synthetic hospitals and compare a SecAgg+ run with a plain one.

The error bound is derived, not picked: each site quantizes each coordinate of its update to one of
T = secagg-quantization-range levels over [-c, c] with stochastic rounding (error < one level, 2c/T),
weights are exact integers, so every coordinate of the weighted mean is within 2c/T of the exact one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy import stats

from client import secagg as site_secagg
from common import secagg
from common.config import RunConfig
from common.data import synthetic
from common.errors import ConfigError
from common.flower_compat import engine, packing
from common.grid_layer import GridLayer
from common.protocol import SECAGG, SECAGG_MASKED, STATUS
from server import checkpoint, runlog
from server import secagg as server_secagg
from server.app import run as run_server
from server.assembly import compose
from server.strategies import build_strategy
from simulation.inprocess import InProcessGrid, run_inprocess

SITES = 5
SHAPES = {"w": (7, 5), "b": (5,)}
P_FLOOR = 1e-6  # a uniformity test fails only below this p-value: a false alarm once in a million runs


class Sites:
    """Five sites answering with the real stage handler; updates and weights chosen by the test.

    `drop`: stage -> sites that fail at that stage (after the stages before it went through)."""

    def __init__(self, drop: dict[str, set[int]] | None = None, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.updates = {n: {k: rng.uniform(-0.5, 0.5, s) for k, s in SHAPES.items()} for n in range(1, SITES + 1)}
        self.weights = {n: 10 * n + 3 for n in range(1, SITES + 1)}
        self.drop = drop or {}
        self.answer = packing.answering_in_kind(self._answer)

    def _answer(self, msg: Message, context) -> Message:
        nid, request = msg.metadata.dst_node_id, msg.content[SECAGG]
        stage = request[secagg.STAGE]
        if nid in self.drop.get(stage, set()):
            raise RuntimeError(f"site {nid} gone at {stage}")
        if stage != secagg.COLLECT:
            return Message(site_secagg.answer(request, context.state, nid), reply_to=msg)
        metrics = {"num-examples": self.weights[nid], "site-weight": 1, "train-loss": 0.5}
        return Message(site_secagg.masked_update(request, context.state, self.updates[nid], self.weights[nid],
                                                 metrics), reply_to=msg)

    def mean(self, alive) -> dict[str, np.ndarray]:
        total = sum(self.weights[n] for n in alive)
        return {k: sum(self.weights[n] * self.updates[n][k] for n in alive) / total for k in SHAPES}


class Spy(GridLayer):
    """Below the strategy, above the wire: every reply the server receives."""

    def __init__(self, inner):
        super().__init__(inner)
        self.replies: list[RecordDict] = []  # their content as it arrived (the server rewrites survivors' later)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.replies += [RecordDict(dict(m.content.items())) for m in replies if not m.has_error()]
        return replies


def _cfg(tmp_path, **kw) -> RunConfig:
    base = dict(num_server_rounds=1, dp_enabled=False, out_dir=str(tmp_path), min_available_sites=SITES,
                secure_aggregation="secaggplus", secagg_threshold=3, secagg_clipping_range=1.0)
    return RunConfig(**{**base, **kw})


def _global() -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, 0.25, dtype=np.float64)) for k, s in SHAPES.items()})


def _round(sites: Sites, cfg: RunConfig):
    grid = compose(InProcessGrid(SITES, client_app=sites.answer), cfg)
    arrays = _global()
    strategy = build_strategy(cfg)
    messages = strategy.configure_train(1, arrays, ConfigRecord(cfg.to_mapping()), grid)
    return server_secagg.train(grid, messages, arrays, cfg, 1)


def _spied(sites: Sites, cfg: RunConfig) -> tuple[Spy, tuple]:
    spy = Spy(None)

    def layer(grid):
        spy.inner = grid
        return spy

    grid = compose(InProcessGrid(SITES, client_app=sites.answer), cfg, simulation=layer)
    arrays = _global()
    messages = build_strategy(cfg).configure_train(1, arrays, ConfigRecord(cfg.to_mapping()), grid)
    return spy, server_secagg.train(grid, messages, arrays, cfg, 1)


def _unmasked(screened) -> dict[str, np.ndarray]:
    ok = [m for m in screened.accepted if not m.has_error()]
    first = ok[0].content["arrays"]
    for m in ok[1:]:  # every survivor's reply carries the same aggregate
        assert all(np.array_equal(m.content["arrays"][k].numpy(), first[k].numpy()) for k in SHAPES)
    return {k: first[k].numpy() - 0.25 for k in SHAPES}


def _bound(cfg: RunConfig) -> float:
    return secagg.Settings.of(cfg).step + 1e-12  # one quantization level (+ float64 arithmetic)


def test_unmasked_mean_equals_the_weighted_mean_within_one_quantization_level(tmp_path):
    cfg = _cfg(tmp_path)
    sites = Sites()
    screened, failed = _round(sites, cfg)
    assert failed == "" and len(screened.accepted) == SITES
    got, want = _unmasked(screened), sites.mean(range(1, SITES + 1))
    for k in SHAPES:
        assert np.max(np.abs(got[k] - want[k])) < _bound(cfg)
    # and the bound is tight enough to mean something: a coarse quantizer is visibly off
    coarse = _cfg(tmp_path, secagg_quantization_range=16)
    got = _unmasked(_round(Sites(), coarse)[0])
    assert max(np.max(np.abs(got[k] - want[k])) for k in SHAPES) > _bound(cfg)
    assert all(np.max(np.abs(got[k] - want[k])) < _bound(coarse) for k in SHAPES)


@pytest.mark.parametrize("dropped", [{4}, {2, 5}])
def test_sites_dropping_after_sharing_keys_leave_the_survivors_sum(tmp_path, dropped):
    """Threshold 3 of 5: one, then two sites gone after key sharing (their pairwise masks rebuilt from
    the survivors' shares of their keys); the round completes with the survivors' weighted mean."""
    cfg = _cfg(tmp_path)
    sites = Sites(drop={secagg.COLLECT: dropped})
    screened, failed = _round(sites, cfg)
    assert failed == ""
    alive = sorted(set(range(1, SITES + 1)) - dropped)
    assert sorted(m.metadata.src_node_id for m in screened.accepted if not m.has_error()) == alive
    assert sum(m.has_error() for m in screened.accepted) == len(dropped)  # counted as failed sites
    got, want = _unmasked(screened), sites.mean(alive)
    for k in SHAPES:
        assert np.max(np.abs(got[k] - want[k])) < _bound(cfg)


def test_too_many_dropouts_fail_the_round_not_the_run(tmp_path):
    _, failed = _round(Sites(drop={secagg.COLLECT: {1, 2, 3}}), _cfg(tmp_path))
    assert "fewer than secagg-threshold = 3" in failed


def test_the_unmasked_mean_is_held_to_max_update_norm(tmp_path):
    """What validation can still check: the mean's norm. One site sending a huge update (it skipped its
    clipping) fails the round; honest sites' mean is accepted."""
    sites = Sites()
    norm = np.sqrt(sum(np.sum(np.square(u)) for u in sites.mean(range(1, SITES + 1)).values()))
    _, failed = _round(sites, _cfg(tmp_path, max_update_norm=float(norm) * 1.01))
    assert failed == ""
    sites.updates[3] = {k: np.full(s, 0.99) for k, s in SHAPES.items()}
    _, failed = _round(sites, _cfg(tmp_path, max_update_norm=float(norm) * 1.01))
    assert "mean update norm" in failed


def test_a_site_lost_during_unmasking_is_tolerated_above_the_threshold(tmp_path):
    cfg = _cfg(tmp_path)
    sites = Sites(drop={secagg.UNMASK: {3}})
    screened, failed = _round(sites, cfg)
    assert failed == ""
    got, want = _unmasked(screened), sites.mean(range(1, SITES + 1))  # its masked vector counted
    assert all(np.max(np.abs(got[k] - want[k])) < _bound(cfg) for k in SHAPES)


def test_the_server_receives_no_individual_update_only_uniform_field_elements(tmp_path):
    """A spy below the strategy: no reply holds a float array, and every masked vector is uniform on
    the 2**62 field (chi-square over 64 equal bins of each reply's elements, p > P_FLOOR). With the masks
    switched off the same test sees the quantized update itself and fails (checked by hand: p ~ 0)."""
    spy, (_, failed) = _spied(Sites(), _cfg(tmp_path))
    masked = [c for c in spy.replies if SECAGG_MASKED in c]
    assert len(masked) == SITES and len(spy.replies) == 4 * SITES  # four stages, five sites
    for content in spy.replies:
        assert "arrays" not in content
        for record in content.array_records.values():
            assert all(a.numpy().dtype == np.int64 for a in record.values())
    for content in masked:
        values = np.concatenate([a.numpy().ravel() for a in content[SECAGG_MASKED].values()])
        counts = np.bincount((values >> (secagg.MOD_BITS - 6)).astype(np.int64), minlength=64)
        assert stats.chisquare(counts).pvalue > P_FLOOR
    assert failed == ""
    # the same statistic on what a site would send unmasked: far from uniform
    plain = np.concatenate([np.ravel(a) for a in secagg.encode(list(Sites().updates[1].values()), 13,
                                                               secagg.Settings.of(_cfg(tmp_path)))])
    assert stats.chisquare(np.bincount(plain >> (secagg.MOD_BITS - 6), minlength=64)).pvalue < P_FLOOR


def test_masks_are_uniform_and_cancel(tmp_path):
    """The mask stream is exactly the field's uniform distribution (KS on 2**16 draws, p > P_FLOOR), and a
    pairwise mask added by one site and subtracted by the other leaves the sum as it was."""
    m = secagg.mask(b"k" * 44, [(1 << 16,)])[0]
    assert stats.kstest(m / secagg.MOD_RANGE, "uniform").pvalue > P_FLOOR
    x = [np.arange(6, dtype=np.int64).reshape(2, 3)]
    assert np.array_equal(secagg.add(secagg.add(x, secagg.mask(b"s" * 32, [(2, 3)])), secagg.mask(b"s" * 32, [(2, 3)]),
                                     -1)[0], x[0])


def test_a_refusing_site_is_a_dropout(tmp_path):
    """A site refusing at the masked-vector stage (budget, policy) is a dropout the protocol tolerates."""
    cfg = _cfg(tmp_path)
    sites = Sites()
    honest = sites.answer

    def answer(msg, context):
        if msg.metadata.dst_node_id == 2 and msg.content[SECAGG][secagg.STAGE] == secagg.COLLECT:
            return Message(RecordDict({STATUS: ConfigRecord({STATUS: "site-policy-refused",
                                                             "refused-setting": "secure-aggregation"})}),
                           reply_to=msg)
        return honest(msg, context)

    sites.answer = answer
    screened, failed = _round(sites, cfg)
    assert failed == "" and [m.metadata.src_node_id for m in screened.refusals] == [2]
    got, want = _unmasked(screened), sites.mean([1, 3, 4, 5])
    assert all(np.max(np.abs(got[k] - want[k])) < _bound(cfg) for k in SHAPES)


@pytest.mark.parametrize("strategy", ["krum", "bulyan", "fedmedian", "fedtrimmedavg", "scaffold"])
def test_strategies_that_need_individual_updates_are_refused(tmp_path, strategy):
    cfg = _cfg(tmp_path, strategy=strategy, momentum=0.0, min_available_sites=7)
    with pytest.raises(ConfigError, match=f"does not compose with strategy = {strategy}"):
        build_strategy(cfg)
    build_strategy(_cfg(tmp_path, strategy=strategy, momentum=0.0, min_available_sites=7,
                        secure_aggregation="off"))  # the same run without SecAgg+ is fine


def test_client_level_dp_is_refused_with_secagg(tmp_path):
    with pytest.raises(ConfigError, match="client-dp = fixed"):
        build_strategy(_cfg(tmp_path, client_dp="fixed"))


def test_a_threshold_above_the_sites_sampled_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="secagg-threshold = 6"):
        _round(Sites(), _cfg(tmp_path, secagg_threshold=6))


# --- end to end: the real ServerApp loop and ClientApp on synthetic hospitals --------------------------------

BASE = {"num-server-rounds": 1, "local-epochs": 1, "batch-size": 16, "learning-rate": 0.1, "dp-enabled": False,
        "min-available-sites": SITES, "seed": 1, "validate-updates": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    synthetic.write_hospitals(root, SITES, seed=9, images_per_site=40)
    return root


def _run(data, tmp_path, name, intercept=None, wrap=None, **settings):
    out = tmp_path / name
    cfg = RunConfig.from_mapping({**BASE, **settings, "data-root": str(data), "state-root": str(out / "sites"),
                                  "out-dir": str(out)})
    run_inprocess(cfg, SITES, intercept=intercept, wrap=wrap)
    return cfg, out, runlog.read(out / runlog.RUN_LOG)


def _weights(out):
    return checkpoint.load(out / checkpoint.MODEL)["state_dict"]


def test_a_secagg_run_equals_the_plain_run_within_the_quantization_bound(data, tmp_path):
    """Same sites, same seed: the plain run's FedAvg and the SecAgg+ run's unmasked mean differ by at most
    one quantization level 2c/T per coordinate, plus float32 rounding of the weights (FedAvg sums five
    float32 products: 8 ulps of the largest weight)."""
    _, plain, _ = _run(data, tmp_path, "plain")
    cfg, masked, log = _run(data, tmp_path, "secagg", secure_aggregation="secaggplus", secagg_threshold=3)
    assert [r["sites_ok"] for r in log if "round" in r] == [SITES]
    a, b = _weights(plain), _weights(masked)
    step = secagg.Settings.of(cfg).step
    for k in a:
        x, y = a[k].double(), b[k].double()
        ulp = 8 * float(torch.finfo(torch.float32).eps) * float(x.abs().max())
        assert float((x - y).abs().max()) <= step + ulp, k
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it really went through the field


def test_each_site_clips_its_update_before_masking(data, tmp_path):
    """The per-site norm bound the server cannot check on a masked update holds by the site's clipping:
    with max-update-norm far below what a round moves, the round is accepted and the model moved at most
    that far (plus one quantization level per coordinate)."""
    cfg, out, log = _run(data, tmp_path, "clipped", secure_aggregation="secaggplus", secagg_threshold=3,
                         **{"validate-updates": True, "max-update-norm": 0.01})
    assert [r["failed"] for r in log] == [None]
    start = checkpoint.load(out / checkpoint.LAST)["state_dict"]  # after round 1 (= the final model)
    moved = _weights(out)
    assert all(torch.equal(start[k], moved[k]) for k in start)
    from server.app import initial_model
    torch.manual_seed(cfg.seed)
    first = initial_model(cfg).state_dict()
    delta = sum(float(((moved[k].double() - first[k].double()) ** 2).sum()) for k in first) ** 0.5
    size = sum(v.numel() for v in first.values())
    assert delta <= 0.01 + secagg.Settings.of(cfg).step * size ** 0.5 + 1e-5


# --- resume: a run stopped mid-protocol redoes that round from setup -------------------------------------------


class Stopped(BaseException):
    """The coordinator going down mid-round (not a site's failure, which the engine reports as an error)."""


class RoundSites(Sites):
    """`Sites` inside the real round loop: they also evaluate, and log every stage they are asked for."""

    def __init__(self, stop_at: tuple[int, str] | None = None):
        super().__init__()
        self.stop_at, self.asked, self.sent = stop_at, [], {}
        self.answer = packing.answering_in_kind(self._answer_all)

    def _answer_all(self, msg: Message, context) -> Message:
        if "evaluate" in msg.metadata.message_type:
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "site-weight": 1, "loss": 1.0})}),
                           reply_to=msg)
        request = msg.content[SECAGG]
        step = (int(request[secagg.ROUND]), str(request[secagg.STAGE]))
        if step == self.stop_at:
            raise Stopped
        self.asked.append(step)
        if step[1] == secagg.COLLECT:  # the model's arrays: each site moves them by its own fixed amount
            self.sent[step[0]] = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
            rng = np.random.default_rng(msg.metadata.dst_node_id)
            self.updates = {**self.updates, msg.metadata.dst_node_id: {
                k: rng.uniform(-0.1, 0.1, v.shape) for k, v in self.sent[step[0]].items()}}
        return self._answer(msg, context)


def _loop(sites: RoundSites, cfg: RunConfig, run_id: int):
    with engine.acting_as(run_id, 0):
        grid = compose(InProcessGrid(SITES, run_id, client_app=sites.answer), cfg)
        return run_server(grid, cfg, str(run_id))


def test_a_run_stopped_mid_protocol_redoes_that_round_from_setup(tmp_path):
    cfg = _cfg(tmp_path / "run", num_server_rounds=3, validate_updates=False)
    straight = RoundSites()
    _loop(straight, _cfg(tmp_path / "straight", num_server_rounds=3, validate_updates=False), 1)

    stopped = RoundSites(stop_at=(2, secagg.UNMASK))  # keys shared, updates masked, then the server dies
    with pytest.raises(Stopped):
        _loop(stopped, cfg, 2)
    saved = checkpoint.load(tmp_path / "run" / checkpoint.LAST)
    assert saved["round"] == 1

    again = RoundSites()
    _loop(again, RunConfig(**{**cfg.__dict__, "resume": True}), 3)
    assert again.asked[:SITES] == [(2, secagg.SETUP)] * SITES  # round 2 from its first stage, fresh keys
    assert sorted({r for r, _ in again.asked}) == [2, 3]
    for k, value in again.sent[2].items():  # ... from exactly the round-1 checkpoint
        assert np.array_equal(value, saved["state_dict"][k].numpy())
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "run")
    step = secagg.Settings.of(cfg).step  # each run's 3 rounds within one level of the exact mean, per round
    assert all(float((a[k].double() - b[k].double()).abs().max()) < 6 * step + 1e-5 for k in a)  # + float32


def test_a_site_sending_another_sites_public_keys_is_left_out_at_setup(tmp_path):
    """A copied or broken public key would make every other site fail in the next stage: that site alone
    is rejected, and the round goes on with the others."""
    cfg = _cfg(tmp_path)
    sites = Sites()
    honest, first = sites.answer, {}

    def answer(msg, context):
        reply = honest(msg, context)
        if msg.content[SECAGG][secagg.STAGE] == secagg.SETUP and not reply.has_error():
            nid = msg.metadata.dst_node_id
            first.setdefault("keys", reply.content[SECAGG])
            if nid == 4:
                reply.content[SECAGG]["pk1"] = first["keys"]["pk1"]
            if nid == 5:
                reply.content[SECAGG]["pk2"] = b"not a key"
        return reply

    sites.answer = answer
    screened, failed = _round(sites, cfg)
    assert failed == ""
    assert sorted(r["node"] for r in screened.rejected) == [4, 5]
    got, want = _unmasked(screened), sites.mean([1, 2, 3])
    assert all(np.max(np.abs(got[k] - want[k])) < _bound(cfg) for k in SHAPES)
