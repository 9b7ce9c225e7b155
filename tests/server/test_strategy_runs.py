"""Strategies end to end with the real ServerApp loop and ClientApp, in-process (no Ray).

Five synthetic hospitals with an easy lesion, no DP, so runs repeat exactly: the tests compare runs
with each other (a rejected site's run with the run without that site, SCAFFOLD's first round with
FedAvg's, FedProx at mu = 0 with FedAvg) rather than a run's accuracy with a bar.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.data import synthetic
from common.errors import ConfigError
from server import checkpoint, runlog
from server.strategies import build_strategy
from simulation.inprocess import run_inprocess

SITES = 5
BASE = {"num-server-rounds": 4, "local-epochs": 3, "batch-size": 16, "learning-rate": 0.1, "dp-enabled": False,
        "min-available-sites": SITES, "seed": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    synthetic.write_hospitals(root, SITES, seed=9, images_per_site=150, lesion_contrast=(0.5, 0.7))  # easy
    return root


def _run(data, tmp_path, name, intercept=None, **settings):
    out = tmp_path / name
    cfg = RunConfig.from_mapping({**BASE, **settings, "data-root": str(data), "state-root": str(out / "sites"),
                                  "out-dir": str(out)})
    run_inprocess(cfg, SITES, intercept=intercept)
    return out, runlog.read(out / runlog.RUN_LOG)


def _weights(out):
    return checkpoint.load(out / checkpoint.MODEL)["state_dict"]


def hostile(kind):
    """Partition 4 trains honestly, then corrupts its update before sending it."""
    def intercept(pid, request, reply):
        if pid != 4 or not request.metadata.message_type.startswith("train") or reply.has_error():
            return reply
        start = {k: a.numpy() for k, a in request.content["arrays"].items()}
        sent = {}
        for k, a in reply.content["arrays"].items():
            w = a.numpy()
            sent[k] = {"nan": np.full_like(w, np.nan), "scaled": start[k] + 1e6 * (w - start[k]),
                       "flipped": start[k] - (w - start[k])}[kind]
        content = RecordDict({"arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in sent.items()}),
                              "metrics": reply.content["metrics"]})
        return Message(content, reply_to=request)
    return intercept


def _without_site_4(data, tmp_path, name, **settings):
    """The same run with the hostile site's hospital not taking part: sites 0-3 train exactly as before."""
    out = tmp_path / name
    cfg = RunConfig.from_mapping({**BASE, **settings, "min-available-sites": SITES - 1, "data-root": str(data),
                                  "state-root": str(out / "sites"), "out-dir": str(out)})
    run_inprocess(cfg, SITES - 1)
    return out


def _same_weights(a, b):
    return all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


ROUNDS_2 = {"num-server-rounds": 2}


@pytest.mark.parametrize("strategy", ["fedavg", "fedtrimmedavg"])
@pytest.mark.parametrize("attack", ["nan", "scaled"])
def test_a_rejected_site_leaves_the_model_the_others_would_have_trained(data, tmp_path, strategy, attack):
    """Validation drops the update before the strategy sees it: the global model equals the 4-site run's."""
    out, records = _run(data, tmp_path, "attacked", hostile(attack), strategy=strategy, **ROUNDS_2)
    assert all(r["sites_rejected"] == 1 and r["rejected"][0]["node"] == 5 for r in records)
    assert ("non-finite" if attack == "nan" else "norm") in records[0]["rejected"][0]["reason"]
    assert _same_weights(_weights(out), _weights(_without_site_4(data, tmp_path, "without", strategy=strategy,
                                                                 **ROUNDS_2)))


def _honest_updates(seen):
    """An intercept that records every site's honest reply before the hostile one corrupts its own."""
    attack = hostile("flipped")

    def intercept(pid, request, reply):
        if request.metadata.message_type.startswith("train") and not reply.has_error():
            seen[pid] = {k: torch.from_numpy(a.numpy().copy()) for k, a in reply.content["arrays"].items()}
        return attack(pid, request, reply)
    return intercept


@pytest.mark.parametrize(("strategy", "bounded"), [("fedtrimmedavg", True), ("fedavg", False)])
def test_a_trimmed_mean_stays_inside_the_honest_sites_range_under_a_sign_flip(data, tmp_path, strategy, bounded):
    """One flipped-sign site passes validation (same norm). A trimmed mean that cuts one value from each end
    of every coordinate keeps each coordinate between the honest sites' smallest and largest; FedAvg does not."""
    seen: dict[int, dict] = {}
    out, records = _run(data, tmp_path, strategy, _honest_updates(seen), strategy=strategy, validate_updates=False,
                        **{"num-server-rounds": 1})
    assert records[0]["sites_ok"] == SITES
    honest = [seen[pid] for pid in range(SITES - 1)]
    aggregate = _weights(out)
    inside = all(((aggregate[k] >= torch.stack([h[k] for h in honest]).amin(0) - 1e-6)
                  & (aggregate[k] <= torch.stack([h[k] for h in honest]).amax(0) + 1e-6)).all() for k in aggregate)
    assert inside is bounded


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_pulls_towards_the_global_model(data, tmp_path):
    settings = {"num-server-rounds": 2}
    avg, _ = _run(data, tmp_path, "avg", **settings)
    prox0, _ = _run(data, tmp_path, "prox0", strategy="fedprox", **settings)
    prox, _ = _run(data, tmp_path, "prox1", strategy="fedprox", proximal_mu=1.0, **settings)
    a, p0, p1 = _weights(avg), _weights(prox0), _weights(prox)
    assert all(torch.equal(a[k], p0[k]) for k in a)
    assert not all(torch.allclose(a[k], p1[k], atol=1e-4) for k in a)


def test_scaffold_starts_as_fedavg_then_corrects_with_control_variates_kept_on_each_site(data, tmp_path):
    """Round 1 has c = c_i = 0, so SCAFFOLD is FedAvg (plain SGD, global step 1) bit for bit; from round 2 the
    variates each site keeps on its disk move the model elsewhere."""
    plain = {"strategy": "scaffold", "momentum": 0.0}
    one, _ = _run(data, tmp_path, "scaffold-1", **plain, **{"num-server-rounds": 1})
    avg_one, _ = _run(data, tmp_path, "fedavg-1", momentum=0.0, **{"num-server-rounds": 1})
    assert all(torch.equal(v, _weights(avg_one)[k]) for k, v in _weights(one).items())
    two, records = _run(data, tmp_path, "scaffold-2", **plain, **ROUNDS_2)
    avg_two, _ = _run(data, tmp_path, "fedavg-2", momentum=0.0, **ROUNDS_2)
    assert not _same_weights(_weights(two), _weights(avg_two))
    assert all(r["sites_ok"] == SITES for r in records)
    files = sorted((two / "sites").glob("site-*/local/scaffold-*.pt"))
    assert len(files) == SITES
    c_i = torch.load(files[0], weights_only=True)
    assert any(v.abs().sum() > 0 for v in c_i.values())


def test_fedbn_keeps_norm_layers_local_and_reports_personalized_scores(data, tmp_path):
    out, records = _run(data, tmp_path, "fedbn", local_norm=True, fine_tune_epochs=1, **{"num-server-rounds": 2})
    norms = torch.load(next((out / "sites" / "site-000" / "local").glob("norms-*.pt")), weights_only=True)
    assert norms and all("norm" in k or k.split(".")[-2].isdigit() for k in norms)
    global_state = _weights(out)
    assert any(not torch.allclose(norms[k], global_state[k]) for k in norms)
    scores = records[-1]["site_scores"]
    assert len(scores) == SITES and all("personal-accuracy" in s and "accuracy" in s for s in scores)
    assert "personal-accuracy" in records[-1]["evaluate"]


@pytest.mark.parametrize(("settings", "match"), [
    ({"strategy": "fedmedian", "client-dp": "fixed"}, "does not compose"),
    ({"strategy": "fedadam", "client-dp": "adaptive"}, "does not compose"),
    ({"strategy": "scaffold"}, "momentum = 0"),
    ({"strategy": "krum", "num-malicious-sites": 2, "min-available-sites": 5}, "at least 7 sites"),
    ({"strategy": "fedavg", "proximal-mu": 0.5}, "only acts with strategy = fedprox"),
])
def test_invalid_combinations_are_refused_with_the_reason(settings, match):
    with pytest.raises(ConfigError, match=match):
        build_strategy(RunConfig.from_mapping(settings))


def test_scaffold_matches_the_published_algorithm_on_a_tiny_problem():
    """Two sites with f_i(w) = |w - a_i|^2 / 2, K plain SGD steps each, three rounds, by hand vs ours."""
    from common.drift import DriftCorrectedSGD, scaffold_update
    from common.flower_compat.engine import acting_as
    from server.scaffold import Scaffold

    targets, K, lr, rounds = [np.array([1.0, -2.0]), np.array([3.0, 0.5])], 4, 0.1, 3
    # reference: Karimireddy et al. 2020, Algorithm 1, option II, global step 1, all N sites sampled
    x, c, ci = np.zeros(2), np.zeros(2), [np.zeros(2), np.zeros(2)]
    for _ in range(rounds):
        ys, dcs = [], []
        for i, a in enumerate(targets):
            y = x.copy()
            for _ in range(K):
                y = y - lr * ((y - a) - ci[i] + c)
            new_ci = ci[i] - c + (x - y) / (K * lr)
            dcs.append(new_ci - ci[i])
            ci[i] = new_ci
            ys.append(y)
        x, c = np.mean(ys, axis=0), c + np.mean(dcs, axis=0)

    strategy = Scaffold(total_sites=2, min_available_nodes=2, min_train_nodes=2)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    site_c = [{"w": torch.zeros(2)}, {"w": torch.zeros(2)}]

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    for server_round in range(1, rounds + 1):
        messages = sorted(strategy.configure_train(server_round, arrays, _config(), Grid()),
                          key=lambda m: m.metadata.dst_node_id)
        replies = []
        for i, msg in enumerate(messages):
            c_server = {"w": torch.from_numpy(msg.content["scaffold-c"]["w"].numpy().copy())}
            w = torch.nn.Parameter(torch.from_numpy(msg.content["arrays"]["w"].numpy().copy()).double())
            opt = DriftCorrectedSGD([w], lr=lr, correction=[(c_server["w"] - site_c[i]["w"]).double()])
            start = w.detach().clone()
            for _ in range(K):
                opt.zero_grad()
                (0.5 * ((w - torch.from_numpy(targets[i])) ** 2).sum()).backward()
                opt.step()
            new, delta = scaffold_update([c_server["w"].double()], [site_c[i]["w"].double()], [start],
                                         [w.detach()], opt.steps, lr)
            site_c[i] = {"w": new[0]}
            with acting_as(1, i + 1):
                replies.append(Message(RecordDict({
                    "arrays": ArrayRecord({"w": Array(w.detach().numpy().astype(np.float32))}),
                    "metrics": MetricRecord({"num-examples": 10}),
                    "scaffold-delta-c": ArrayRecord({"w": Array(delta[0].numpy())}),
                }), reply_to=msg))
        arrays, _ = strategy.aggregate_train(server_round, replies)
    assert np.allclose(arrays["w"].numpy(), x, atol=1e-5)
    assert np.allclose(strategy.control["w"], c, atol=1e-5)
    assert np.allclose(site_c[0]["w"].numpy(), ci[0], atol=1e-5)
    assert not np.allclose(c, 0)  # the variates really moved


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord({})


def test_run_log_is_json_per_round(data, tmp_path):
    out, _ = _run(data, tmp_path, "log", **{"num-server-rounds": 1})
    lines = [json.loads(x) for x in (out / runlog.RUN_LOG).read_text().splitlines()]
    assert lines[0] == {"event": "grid", "layers": ["WaitingGrid", "PromptGrid", "PackedGrid", "InProcessGrid"]}
    line = lines[1]
    assert line["round"] == 1 and line["sites_rejected"] == 0 and len(line["site_scores"]) == SITES


def test_with_flowers_workarounds_off_the_stack_drops_them_and_the_run_is_the_same(data, tmp_path, monkeypatch):
    """The packed wire and prompt polling are lossless speed-ups: switched off, the same weights come out."""
    from common import flower_compat

    on, _ = _run(data, tmp_path, "on", **{"num-server-rounds": 2})
    monkeypatch.setenv(flower_compat.SWITCH, "off")
    assert not flower_compat.enabled()
    off, _ = _run(data, tmp_path, "off", **{"num-server-rounds": 2})
    assert runlog.events(off / runlog.RUN_LOG)[0] == {"event": "grid", "layers": ["WaitingGrid", "InProcessGrid"]}
    assert runlog.events(on / runlog.RUN_LOG)[0]["layers"] == ["WaitingGrid", "PromptGrid", "PackedGrid",
                                                                "InProcessGrid"]
    a, b = _weights(on), _weights(off)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedadagrad", "fedmedian", "krum", "bulyan"])
def test_every_strategy_runs_rounds_and_keeps_the_models_dtype(data, tmp_path, strategy):
    extra = {"num-malicious-sites": 1} if strategy == "krum" else {}
    out, records = _run(data, tmp_path, strategy, strategy=strategy, **{"num-server-rounds": 2, "local-epochs": 1},
                        **extra)
    assert [r["sites_ok"] for r in records] == [SITES, SITES] and not any(r["sites_rejected"] for r in records)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in _weights(out).values())
