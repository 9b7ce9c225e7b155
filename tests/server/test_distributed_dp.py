"""Distributed DP under SecAgg+ (dp-mode = distributed): each round is one central DP-SGD step on the pooled
sampled batch, its noise split over the sites so that only the unmasked sum carries all of it.

The claims tested: the sum of the sites' steps is the pooled DP-SGD step (within one quantization level);
each site adds noise of std sigma·C/sqrt(t) and the unmasked sum of t sites' noise has std sigma·C; a site refuses
what would break the mechanism before it reads an image (or, for its budget, before it takes a step);
its ledger records the round as a release of (sigma, q, 1 step) as Opacus's accountant states it; a round
with fewer than t survivors is discarded. Standard deviations are tested with a chi-square on the sample
variance over every trainable coordinate (the cnn's 15,354), at p > P_FLOOR: the estimate is then within
~3% of the truth, where the wrong calibrations (sigma·C at each site, or sigma·C/sqrt(t) for the sum) are
a factor sqrt(3) away (each test also checks that one is rejected).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from opacus.accountants import RDPAccountant
from scipy import stats

from client import app as site_app
from client import secagg as site_secagg
from client.site import Site, site_from_context
from common import ledger, secagg, training
from common.config import RunConfig, SiteConfig
from common.data import synthetic
from common.errors import ConfigError
from common.flower_compat import engine
from common.models import build_model, grad_sample_mode
from common.protocol import BUDGET_SPENT, POLICY_REFUSED, REFUSED_SETTING, SECAGG, STATUS
from common.weights import to_record
from server import checkpoint, runlog
from server.app import initial_model
from simulation.inprocess import run_inprocess

SITES = 3
P_FLOOR = 1e-6  # a variance test fails only below this p-value: a false alarm once in a million runs
DISTRIBUTED = {"dp-mode": "distributed", "secure-aggregation": "secaggplus", "secagg-threshold": SITES,
               "dp-noise-multiplier": 1.0, "dp-target-epsilon": 8.0}
BASE = {"num-server-rounds": 1, "batch-size": 64, "learning-rate": 0.1, "min-available-sites": SITES, "seed": 1,
        **DISTRIBUTED}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    synthetic.write_hospitals(root, SITES, seed=9, images_per_site=40)
    return root


def _cfg(data, out, **settings) -> RunConfig:
    return RunConfig.from_mapping({**BASE, **settings, "data-root": str(data), "state-root": str(out / "sites"),
                                   "out-dir": str(out)})


def _run(data, out, intercept=None, **settings):
    cfg = _cfg(data, out, **settings)
    run_inprocess(cfg, SITES, intercept=intercept)
    return cfg, runlog.read(out / runlog.RUN_LOG)


def _weights(out) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in checkpoint.load(out / checkpoint.MODEL)["state_dict"].items()}


def _start(cfg: RunConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed)  # as the ServerApp builds the round-1 model
    return {k: v.double() for k, v in initial_model(cfg).state_dict().items()}


def _trainable(cfg: RunConfig) -> list[str]:
    model = build_model(cfg.task, cfg.model, 1, cfg.num_classes, cfg.image_size)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _std_test(values: np.ndarray, std: float) -> float:
    """Two-sided chi-square p-value of the sample variance of zero-mean `values` against `std`."""
    stat = float(np.sum(np.square(values))) / std**2
    cdf = stats.chi2.cdf(stat, df=values.size)
    return 2 * min(cdf, 1 - cdf)


def test_the_sum_of_the_sites_steps_is_one_pooled_dp_sgd_step(data, tmp_path):
    """q = 1 (batch-size above every site's n) and sigma tiny: the distributed round's global model is one
    Opacus DP-SGD step (clip C, no noise, same lr) on the union of the sites' training splits, within one
    quantization level 2c/T per coordinate (+ the tiny noise and float32 rounding)."""
    cfg, log = _run(data, tmp_path / "dist", **{"dp-noise-multiplier": 1e-4, "dp-target-epsilon": 1e12,
                                                "secagg-clipping-range": 1.0})
    assert [r["sites_ok"] for r in log if "round" in r] == [SITES]
    train = torch.utils.data.ConcatDataset([site_from_context(cfg, {"partition-id": p}).data()[0]
                                            for p in range(SITES)])
    torch.manual_seed(cfg.seed)
    model = initial_model(cfg)
    before = {k: v.double().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    from opacus import PrivacyEngine
    module, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, noise_multiplier=0.0, max_grad_norm=cfg.dp_max_grad_norm,
        data_loader=torch.utils.data.DataLoader(train, batch_size=len(train)), poisson_sampling=False,
        grad_sample_mode=grad_sample_mode(model))
    x, y = next(iter(loader))
    assert len(y) == len(train)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    optimizer.step()
    pooled = {k: v.double() for k, v in model.state_dict().items()}
    got = _weights(tmp_path / "dist")
    noise = 6 * cfg.learning_rate * cfg.dp_noise_multiplier * cfg.dp_max_grad_norm / len(train)  # 6 std of the sum's
    bound = secagg.Settings.of(cfg).step + noise + 1e-6
    for k in pooled:
        assert float((got[k] - pooled[k]).abs().max()) <= bound, k
    moved = max(float((pooled[k] - before[k]).abs().max()) for k in pooled)
    assert moved > 100 * bound  # the step is far larger than the agreement asked


def test_each_site_adds_noise_of_std_sigma_c_over_sqrt_t(data, tmp_path):
    """One site, the same start and (q = 1) the same batch in two rounds: the updates differ by
    -lr (z1 - z2) / B only, so their difference / sqrt(2) has each site's noise std lr sigma·C / (sqrt(t) B)."""
    cfg = _cfg(data, tmp_path, **{"dp-target-epsilon": 100.0})
    site = Site(cfg, SiteConfig(str(cfg.site_data_path(0)), str(cfg.site_state_dir(0)), "cpu"), 0)
    start = to_record(initial_model(cfg))
    steps = [site.train_distributed(start, r, "run", SITES) for r in (1, 2)]
    (a, _, weight), (b, _, _) = steps
    assert weight == len(site.data()[0])  # q = 1: Opacus's expected batch is the whole split
    diff = np.concatenate([(a[k].numpy().astype(np.float64) - b[k].numpy()).ravel() for k in _trainable(cfg)])
    share = cfg.learning_rate * cfg.dp_noise_multiplier * cfg.dp_max_grad_norm / (math.sqrt(SITES) * weight)
    assert _std_test(diff / math.sqrt(2), share) > P_FLOOR
    assert _std_test(diff / math.sqrt(2), share * math.sqrt(SITES)) < P_FLOOR  # sigma·C at each site: told apart


def test_the_unmasked_sum_of_t_sites_noise_has_std_sigma_c(data, tmp_path):
    """Two runs of one round, the same seed (same start, same batches at q = 1) and other site secrets (so
    fresh noise): the global models differ by -lr (Σz - Σz') / N, the SecAgg+ sum's noise, std lr sigma·C / N."""
    cfg, _ = _run(data, tmp_path / "a")
    _run(data, tmp_path / "b")
    n = sum(len(site_from_context(cfg, {"partition-id": p}).data()[0]) for p in range(SITES))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    diff = np.concatenate([(a[k] - b[k]).numpy().ravel() for k in _trainable(cfg)])
    central = cfg.learning_rate * cfg.dp_noise_multiplier * cfg.dp_max_grad_norm / n
    assert _std_test(diff / math.sqrt(2), central) > P_FLOOR
    assert _std_test(diff / math.sqrt(2), central / math.sqrt(SITES)) < P_FLOOR


def test_a_distributed_run_trains_and_each_site_ledger_states_opacus_epsilon(data, tmp_path):
    """3 sites, 2 rounds, end to end: both rounds unmasked with every site; each site's ledger holds two
    distributed entries of (sigma, q_k, 1 step), and the ε it reports is Opacus's RDP accountant's for them."""
    cfg, log = _run(data, tmp_path, **{"num-server-rounds": 2, "batch-size": 16})
    rounds = [r for r in log if "round" in r]
    assert [(r["sites_ok"], r["failed"]) for r in rounds] == [(SITES, None)] * 2
    moved = _weights(tmp_path)
    start = _start(cfg)
    assert any(not torch.allclose(moved[k], start[k]) for k in start)
    for pid in range(SITES):
        site = site_from_context(cfg, {"partition-id": pid})
        entries = ledger.PrivacyLedger(cfg.site_state_dir(pid)).entries()
        q = 1 / math.ceil(len(site.data()[0]) / cfg.batch_size)
        assert [(e.mode, e.noise_multiplier, e.sample_rate, e.steps) for e in entries] == \
            [(ledger.DISTRIBUTED, cfg.dp_noise_multiplier, q, 1)] * 2
        accountant = RDPAccountant()
        for _ in range(2):
            accountant.step(noise_multiplier=cfg.dp_noise_multiplier, sample_rate=q)
        reported = next(s["epsilon"] for s in rounds[-1]["sites"] if s["node"] == pid + 1)
        assert reported == pytest.approx(accountant.get_epsilon(cfg.dp_target_delta), rel=1e-9)
        assert reported <= cfg.dp_target_epsilon


def test_fewer_than_t_survivors_discard_the_round(data, tmp_path):
    """A site lost after sharing keys leaves 2 of t = 3: the sum cannot be unmasked, so no sum with less
    noise than planned is released; the round fails and the global model stays as it was."""

    def lose_site_2(pid, request, reply):
        if pid == 1 and SECAGG in request.content and request.content[SECAGG][secagg.STAGE] == secagg.COLLECT:
            return Message(Error(code=0, reason="gone"), reply_to=request)
        return reply

    cfg, log = _run(data, tmp_path, intercept=lose_site_2)
    (result,) = [r for r in log if "round" in r]
    assert "fewer than secagg-threshold = 3" in result["failed"]
    got, start = _weights(tmp_path), _start(cfg)
    assert all(torch.equal(got[k], start[k]) for k in start)


# --- what a site refuses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "value"), [("secure-aggregation", "off"), ("optimizer", "adam"),
                                                ("dp-enabled", False), ("client-dp", "fixed"),
                                                ("dp-noise-multiplier", 0.0)])
def test_settings_that_break_the_mechanism_are_one_config_error(setting, value):
    with pytest.raises(ConfigError, match=f"dp-mode = distributed needs {setting} = "):
        RunConfig.from_mapping({**DISTRIBUTED, setting: value})
    RunConfig.from_mapping({**DISTRIBUTED, "dp-mode": "local", setting: value})  # local mode: not its business


SETUP = {secagg.STAGE: secagg.SETUP, secagg.ROUND: 1, secagg.Key.SAMPLE_NUMBER: 3, secagg.Key.SHARE_NUMBER: 3,
         secagg.Key.THRESHOLD: 3, secagg.Key.CLIPPING_RANGE: 8.0, secagg.Key.TARGET_RANGE: 2**22,
         secagg.Key.MOD_RANGE: secagg.MOD_RANGE, secagg.Key.MAX_WEIGHT: 1000}


@pytest.fixture
def watched(monkeypatch):
    """What a refused round must not reach: the site's images, and any training step."""
    seen: list[str] = []
    real_data, real_step = Site.data, training.one_step
    monkeypatch.setattr(Site, "data", lambda self: seen.append("data") or real_data(self))
    monkeypatch.setattr(training, "one_step", lambda *a, **k: seen.append("step") or real_step(*a, **k))
    with engine.acting_as(1, 0):
        yield seen


def _at_collect(threshold: int) -> tuple[RecordDict, ConfigRecord]:
    """Site 1's state after setup and share keys of a 3-site round at `threshold`, and its collect request."""
    states = {n: RecordDict() for n in (1, 2, 3)}
    keys = {}
    for n, state in states.items():
        reply = site_secagg.answer(ConfigRecord({**SETUP, secagg.Key.THRESHOLD: threshold}), state, n)[SECAGG]
        keys[str(n)] = [reply["pk1"], reply["pk2"]]
    forward: list = []
    for n, state in states.items():
        reply = site_secagg.answer(ConfigRecord({secagg.STAGE: secagg.SHARE_KEYS, secagg.ROUND: 1, **keys}), state, n)
        forward += [(n, c) for dst, c in zip(reply[SECAGG]["dsts"], reply[SECAGG]["ctxts"], strict=True) if dst == 1]
    return states[1], ConfigRecord({secagg.STAGE: secagg.COLLECT, secagg.ROUND: 1,
                                    secagg.Key.CIPHERTEXT_LIST: [c for _, c in forward],
                                    secagg.Key.SOURCE_LIST: [s for s, _ in forward]})


def _ask(run: dict, node: dict, state: RecordDict | None = None, stage: ConfigRecord | None = None) -> Message:
    """The real ClientApp at a hospital (its own node config and policy) asked for a train round."""
    config = {**run, "server-round": 1}
    model = build_model("classification", "cnn", 1, 2, 32)
    content = RecordDict({"arrays": to_record(model), "config": ConfigRecord(config)})
    if stage is not None:
        content[SECAGG] = stage
    msg = Message(content=content, message_type="train", dst_node_id=1, group_id="1")
    engine.stamp_message_id(msg)
    return site_app.app(msg, Context(1, 1, node, state if state is not None else RecordDict(), {}))


def _node(hospitals, tmp_path, **policy) -> dict:
    return {"data-path": str(hospitals / "site-000"), "state-dir": str(tmp_path / "state"), **policy}


@pytest.mark.parametrize(("setting", "value"), [("secure-aggregation", "off"), ("optimizer", "adam")])
def test_a_site_refuses_a_distributed_run_that_breaks_the_mechanism_before_reading_an_image(
        hospitals, tmp_path, watched, setting, value):
    """The site parses the run's settings itself (RunConfig): a coordinator skipping its own check still
    meets the site's. The site fails the request with the error's name only, before any image is read."""
    run = {**RunConfig(secure_aggregation="secaggplus", dp_mode="distributed", dp_noise_multiplier=1.0)
           .to_mapping(), setting: value}
    with pytest.raises(Exception, match="site failed: ConfigError"):
        _ask(run, _node(hospitals, tmp_path))
    assert watched == []


def test_a_site_refuses_distributed_dp_over_fewer_sites_than_its_minimum_before_reading_an_image(
        hospitals, tmp_path, watched):
    """secagg-threshold 2 (as this site checked it at setup) under distributed-dp-min-sites = 3 (the default):
    a policy refusal naming secagg-threshold; at the site's minimum it trains."""
    state, stage = _at_collect(threshold=2)
    run = {**BASE, "secagg-threshold": 2}
    reply = _ask(run, _node(hospitals, tmp_path), state, stage)
    assert dict(reply.content[STATUS]) == {STATUS: POLICY_REFUSED, REFUSED_SETTING: "secagg-threshold"}
    assert watched == []
    state, stage = _at_collect(threshold=2)
    reply = _ask(run, _node(hospitals, tmp_path, **{"distributed-dp-min-sites": 2}), state, stage)
    assert STATUS not in reply.content and watched == ["data", "step"]


@pytest.mark.parametrize(("setting", "spent"), [("privacy-budget", 0.5), ("dp-target-epsilon", 0.5)])
def test_a_site_refuses_a_distributed_round_over_its_budget_or_the_run_target_before_any_step(
        hospitals, tmp_path, watched, setting, spent):
    """ε of (sigma, q_k, 1 step) above the site's budget, or above the run's target: a budget refusal, no
    step taken, nothing in the ledger. The images are read: q_k = 1/ceil(n / batch-size) needs the size
    of the site's training split, which only its decoded files give (the same order as a local round)."""
    state, stage = _at_collect(threshold=3)
    run = {**BASE, **({"dp-target-epsilon": spent} if setting == "dp-target-epsilon" else {})}
    node = _node(hospitals, tmp_path, **({"privacy-budget": spent} if setting == "privacy-budget" else {}))
    reply = _ask(run, node, state, stage)
    assert reply.content[STATUS][STATUS] == BUDGET_SPENT
    assert reply.content[STATUS]["epsilon-next"] > spent
    assert "step" not in watched
    assert ledger.PrivacyLedger(tmp_path / "state").entries() == []


def test_a_distributed_update_is_masked_as_opacus_stepped_it_without_the_norm_rescale(
        hospitals, tmp_path, watched, monkeypatch):
    """max-update-norm far below the step's norm: a local round's update would be rescaled to it before
    masking; a distributed one is masked as Opacus stepped it (scaling a share by its own noisy norm is
    not the mechanism the ledger accounts), and weighted by Opacus's expected batch q·n."""
    masked = []
    real = site_secagg.masked_update
    monkeypatch.setattr(site_secagg, "masked_update",
                        lambda request, state, update, weight, metrics: masked.append((update, weight)) or
                        real(request, state, update, weight, metrics))
    state, stage = _at_collect(threshold=3)
    reply = _ask({**BASE, "max-update-norm": 1e-6, "batch-size": 8}, _node(hospitals, tmp_path), state, stage)
    assert set(reply.content.keys()) == {SECAGG, "secagg-masked", "metrics"}
    ((update, weight),) = masked
    norm = math.sqrt(sum(float(np.sum(np.square(u))) for u in update.values()))
    assert norm > 1e3 * 1e-6
    n = reply.content["metrics"]["num-examples"]
    assert n > 8 and weight == int(n / math.ceil(n / 8))  # q = 1/ceil(n/8) < 1: not n
    entries = ledger.PrivacyLedger(tmp_path / "state").entries()
    assert [(e.mode, e.steps) for e in entries] == [(ledger.DISTRIBUTED, 1)]


def test_an_empty_poisson_batch_still_adds_the_sites_noise():
    """Poisson sampling may draw no image: the step is taken anyway, a zero clipped sum plus the noise,
    or the sum would carry one share less than the threshold promises."""
    from torch.utils.data import DataLoader, TensorDataset

    from common import drift, privacy

    torch.manual_seed(0)
    model = build_model("classification", "cnn", 1, 2, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = TensorDataset(torch.randn(20, 1, 32, 32), torch.randint(0, 2, (20,)))
    dp = privacy.distributed_plan(1.0, SITES, 1e-5, 20, 64, 10, 1.0)
    optimizer = drift.make_optimizer("sgd", list(model.parameters()), lr=1.0, momentum=0.9)
    _, module, optimizer, loader = privacy.make_private(model, optimizer, DataLoader(train, batch_size=64), dp)
    loader.batch_sampler.sample_rate = 1e-12  # Opacus's Poisson sampler: now it draws nobody
    assert training.one_step(module, loader, optimizer, torch.device("cpu")) == 0
    moved = np.concatenate([(model.state_dict()[k] - before[k]).numpy().ravel() for k in before])
    share = dp.added_noise_multiplier * dp.max_grad_norm / optimizer.expected_batch_size
    assert _std_test(moved, share) > P_FLOOR
