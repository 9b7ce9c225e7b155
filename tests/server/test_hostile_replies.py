"""One site's reply, however malformed, costs that site its round and never the run.

Every case goes through the real ServerApp round loop and ClientApp in-process (packed wire included),
with partition 4 corrupting its reply every round. The run must finish all rounds, reject the site
every round with the expected reason class, and end with the model the other four sites train
without it (tests/server/test_strategy_runs.py's `_without_site_4`), to 1e-6.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.data import synthetic
from common.flower_compat import packing
from common.protocol import BUDGET_SPENT, SCAFFOLD_DELTA, STATUS
from server import checkpoint, runlog, strategies, validation
from server.scaffold import Scaffold
from simulation import report
from simulation.inprocess import run_inprocess

SITES = 5
HOSTILE = 4  # partition id; its node id is 5
BASE = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 16, "learning-rate": 0.1, "dp-enabled": False,
        "min-available-sites": SITES, "seed": 1}
SCAFFOLD = {"strategy": "scaffold", "momentum": 0.0}
FLOAT16 = {"update-dtype": "float16"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-data")
    synthetic.write_hospitals(root, SITES, seed=9, images_per_site=40, lesion_contrast=(0.5, 0.7))
    return root


@pytest.fixture(scope="module")
def without(data, tmp_path_factory):
    """The run without partition 4's hospital, per settings, each trained once for the module."""
    cache: dict[str, dict] = {}

    def get(sites: int = SITES - 1, **settings) -> dict:
        key = json.dumps([sites, settings], sort_keys=True)
        if key not in cache:
            with pytest.MonkeyPatch.context() as patch:
                if settings.get("strategy") == "scaffold":
                    patch.setattr(strategies, "Scaffold", _ScaffoldOfFive)
                out = _run(data, tmp_path_factory.mktemp("without"), sites, None, **settings)
            cache[key] = {"weights": _weights(out), "records": runlog.read(out / runlog.RUN_LOG)}
        return cache[key]
    return get


class _ScaffoldOfFive(Scaffold):
    """SCAFFOLD moves c by |S|/N, N the consortium's size: a rejected site is still one of the five."""

    def __init__(self, *, total_sites: int, **fedavg) -> None:
        super().__init__(total_sites=SITES, **fedavg)


def _run(data, out, sites, intercept, **settings):
    cfg = _cfg(data, out, sites, **settings)
    run_inprocess(cfg, sites, intercept=intercept)
    return out


def _cfg(data, out, sites, **settings):
    return RunConfig.from_mapping({**BASE, "min-available-sites": sites, **settings, "data-root": str(data),
                                   "state-root": str(out / "sites"), "out-dir": str(out)})


def _weights(out):
    return checkpoint.load(out / checkpoint.MODEL)["state_dict"]


def _same_weights(a, b):
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


# ---- the corruptions: (partition 4's honest reply content, the request) -> what it sends instead ----

def _metrics(content: RecordDict, **changes) -> RecordDict:
    values = dict(content["metrics"])
    values.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        values.pop(k)
    content["metrics"] = MetricRecord(values)
    return content


def _garbage_packed(content, request):
    content["arrays"] = ArrayRecord({packing.KEY: Array(np.frombuffer(b"\xff" * 8 + b"not a header", np.uint8))})
    return content


def _second_arrays(content, request):
    content["extra"] = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    return content


def _bad_delta(content, request):
    delta = content[SCAFFOLD_DELTA]
    first = next(iter(delta.keys()))
    content[SCAFFOLD_DELTA] = ArrayRecord({k: Array(delta[k].numpy().ravel()[:1].copy() if k == first
                                                    else delta[k].numpy()) for k in delta})
    return content


def _bad_float16(content, request):
    arrays = content["arrays"]
    first = next(k for k in arrays if arrays[k].numpy().dtype == np.float16)
    content["arrays"] = ArrayRecord({k: Array(arrays[k].numpy()[..., :1].copy() if k == first
                                              else arrays[k].numpy()) for k in arrays})
    return content


def _drop_key(train_key, evaluate_key):
    def corrupt(content, request):
        key = train_key if request.metadata.message_type.startswith("train") else evaluate_key
        return _metrics(content, **{key: None})
    return corrupt


def _set(**changes):
    """A metric set (or added) in train and evaluate replies alike: `loss`-like keys map to each phase's own."""
    def corrupt(content, request):
        train = request.metadata.message_type.startswith("train")
        named = {("train-loss" if train else "loss") if k == "score" else k.replace("_", "-"): v
                 for k, v in changes.items()}
        return _metrics(content, **named)
    return corrupt


# case: (corruption, reason class, settings, whether evaluate replies are corrupted too)
CASES = {
    "malformed-packed-array": (_garbage_packed, "unpack", {}, False),
    "extra-metric-key": (_set(favourite_colour=1.0), "schema", {}, True),
    "different-metric-keys": (_drop_key("train-loss", "loss"), "schema", {}, True),
    "list-valued-metric": (_set(score=[0.1, 0.2]), "schema", {}, True),
    "nan-metric": (_set(score=math.nan), "non-finite", {}, True),
    "inf-metric": (_set(score=math.inf), "non-finite", {}, True),
    "second-arrayrecord": (_second_arrays, "schema", {}, False),
    "scaffold-delta-wrong-shape": (_bad_delta, "schema", SCAFFOLD, False),
    "float16-update-wrong-shape": (_bad_float16, "schema", FLOAT16, False),
    "num-examples-nan": (_set(num_examples=math.nan), "non-finite", {}, True),
    "num-examples-negative": (_set(num_examples=-5), "schema", {}, True),
    "num-examples-1e12": (_set(num_examples=10**12), "schema", {}, True),
    "num-examples-non-integer": (_set(num_examples=12.5), "schema", {}, True),
}


def hostile(corrupt, evaluate=False, pid=HOSTILE, rounds=None):
    """Partition `pid` answers honestly, then corrupts its reply (train; evaluate too if asked)."""
    def intercept(p, request, reply):
        kind = request.metadata.message_type
        server_round = int(request.content["config"]["server-round"])
        if p != pid or reply.has_error() or not (kind.startswith("train") or evaluate):
            return reply
        if rounds is not None and server_round not in rounds:
            return reply
        return Message(corrupt(RecordDict(dict(reply.content.items())), request), reply_to=request)
    return intercept


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_reply_is_rejected_and_the_model_is_the_other_sites(data, without, tmp_path, case):
    corrupt, check, settings, evaluate = CASES[case]
    out = _run(data, tmp_path, SITES, hostile(corrupt, evaluate), **settings)
    records = runlog.read(out / runlog.RUN_LOG)
    assert [r["round"] for r in records] == [1, 2]
    phases = ["train", "evaluate"] if evaluate else ["train"]
    for record in records:
        assert [(r["node"], r["phase"], r["class"]) for r in record["rejected"]] == \
            [(HOSTILE + 1, phase, check) for phase in phases], record["rejected"]
        assert record["sites_ok"] == SITES - 1 and record["sites_rejected"] == 1 and not record["failed"]
    clean = without(**settings)
    assert _same_weights(_weights(out), clean["weights"])
    if evaluate:  # the hostile site's scores are left out as well
        assert records[-1]["evaluate"] == pytest.approx(clean["records"][-1]["evaluate"], abs=1e-6)


def test_rejections_show_in_results_and_rounds_csv_with_their_class(data, tmp_path):
    out = _run(data, tmp_path, SITES, hostile(_set(score=math.nan), evaluate=True))
    results = json.loads(report.write(out, _cfg(data, out, SITES).to_mapping(), SITES).read_text())
    assert [r["sites_rejected"] for r in results["rounds"]] == [1, 1]
    assert {(r["round"], r["phase"], r["class"]) for r in results["rejected"]} == \
        {(n, phase, "non-finite") for n in (1, 2) for phase in ("train", "evaluate")}
    with open(out / report.ROUNDS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r["sites_rejected"] for r in rows] == ["1", "1"]
    assert all(r["rejected"] == "train:non-finite evaluate:non-finite" for r in rows)


# ---- bounded influence ----

TWO = {"local-epochs": 3, "num-server-rounds": 3}  # enough to learn: the two-site tests compare accuracies


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two larger hospitals, and their honest runs (weighted by example count, and uniform)."""
    root = tmp_path_factory.mktemp("two")
    synthetic.write_hospitals(root / "data", 2, seed=9, images_per_site=150, lesion_contrast=(0.5, 0.7))
    runs = {name: _run(root / "data", root / name, 2, None, **TWO, **extra)
            for name, extra in (("clean", {}), ("uniform", {"max-site-weight": 1}))}
    return root, {name: (_weights(out), runlog.read(out / runlog.RUN_LOG)) for name, out in runs.items()}


def test_a_site_claiming_a_huge_count_weighs_no_more_than_max_site_weight(two, tmp_path):
    """Site 1 trains honestly but claims 10^8 examples (under the schema's bound, so not rejected). With
    max-site-weight = 1 the run is exactly the honest uniform run; uncapped, the lie moves the model."""
    root, clean = two
    claim = hostile(_set(num_examples=10**8), pid=1)
    capped = _run(root / "data", tmp_path / "capped", 2, claim, **TWO, **{"max-site-weight": 1})
    assert _same_weights(_weights(capped), clean["uniform"][0])
    uncapped = _run(root / "data", tmp_path / "uncapped", 2, claim, **TWO, **{"max-site-weight": 10**9})
    assert not _same_weights(_weights(uncapped), clean["clean"][0])


def test_a_two_site_run_with_a_site_claiming_1e12_examples_goes_on_with_the_other(two, tmp_path):
    """Above MAX_EXAMPLES a count is rejected, not capped: the run is the honest site's alone."""
    root, _ = two
    out = _run(root / "data", tmp_path / "lie", 2, hostile(_set(num_examples=10**12), pid=1), **TWO)
    records = runlog.read(out / runlog.RUN_LOG)
    assert len(records) == 3
    assert all([(r["node"], r["class"]) for r in rec["rejected"]] == [(2, "schema")] and rec["sites_ok"] == 1
               for rec in records)
    alone = _run(root / "data", tmp_path / "alone", 1, None, **TWO)
    assert _same_weights(_weights(out), _weights(alone))


def _scaled(factor):
    def corrupt(content, request):
        start = request.content["arrays"]
        sent = content["arrays"]
        content["arrays"] = ArrayRecord({k: Array((start[k].numpy() + factor * (sent[k].numpy() - start[k].numpy()))
                                                  .astype(sent[k].numpy().dtype)) for k in sent})
        return content
    return corrupt


def test_the_relative_norm_check_works_with_two_sites(data, without, tmp_path):
    out = _run(data, tmp_path, 2, hostile(_scaled(1e3), pid=1))
    records = runlog.read(out / runlog.RUN_LOG)
    assert all([(r["node"], r["class"]) for r in rec["rejected"]] == [(2, "norm")] for rec in records)
    assert "x the other" in records[0]["rejected"][0]["reason"]
    assert _same_weights(_weights(out), without(sites=1)["weights"])


def test_max_update_norm_rejects_what_the_relative_check_lets_through(data, without, tmp_path):
    loose = {"update-norm-ratio": 1e9, "max-update-norm": 1e3}
    out = _run(data, tmp_path, 2, hostile(_scaled(1e6), pid=1), **loose)
    records = runlog.read(out / runlog.RUN_LOG)
    assert all([(r["node"], r["class"]) for r in rec["rejected"]] == [(2, "norm")] for rec in records)
    assert "max-update-norm" in records[0]["rejected"][0]["reason"]
    assert _same_weights(_weights(out), without(sites=1)["weights"])


# ---- honest oddities and the aggregate ----

def _refusal_with_inf(content, request):
    return RecordDict({STATUS: ConfigRecord({STATUS: BUDGET_SPENT, "epsilon-total": 0.0, "privacy-budget": 1.0,
                                             "epsilon-next": math.inf})})


def test_a_refusal_with_epsilon_next_inf_is_logged_as_null_and_the_run_goes_on(data, without, tmp_path):
    out = _run(data, tmp_path, SITES, hostile(_refusal_with_inf))
    records = runlog.read(out / runlog.RUN_LOG)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["refused"] == [{"node": HOSTILE + 1, STATUS: BUDGET_SPENT, "epsilon-total": 0.0,
                                      "privacy-budget": 1.0, "epsilon-next": None}]
        assert record["sites_refused"] == 1 and not record["rejected"]
    assert _same_weights(_weights(out), without()["weights"])


def _nan_weights(content, request):
    arrays = content["arrays"]
    content["arrays"] = ArrayRecord({k: Array(np.full_like(arrays[k].numpy(), np.nan)) for k in arrays})
    return content


def test_a_non_finite_aggregate_is_never_checkpointed(data, without, tmp_path):
    """Validation off, so a NaN update in round 2 reaches FedAvg: the aggregate is NaN, the round fails,
    the model stays round 1's, and neither checkpoint ever holds a NaN."""
    off = {"validate-updates": False}
    out = _run(data, tmp_path, SITES, hostile(_nan_weights, rounds={2}), **off)
    records = runlog.read(out / runlog.RUN_LOG)
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["failed"] is None and "non-finite aggregate" in records[1]["failed"]
    assert records[1]["sites_ok"] == SITES and records[1]["evaluate"]["accuracy"] is not None
    round_one = without(sites=SITES, **off, **{"num-server-rounds": 1})["weights"]
    for path in (out / checkpoint.MODEL, out / checkpoint.LAST):
        saved = checkpoint.load(path)["state_dict"]
        assert all(torch.isfinite(v).all() for v in saved.values())
        assert _same_weights(saved, round_one)


# ---- the guard itself ----

def _reply(node, w, examples=10):
    from common.flower_compat.engine import acting_as

    request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    with acting_as(1, node):
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(w, np.float32))}),
                                   "metrics": MetricRecord({"num-examples": examples, "site-weight": 1})}),
                       reply_to=request)


def test_an_unexpected_error_in_one_replys_check_rejects_that_reply_only(monkeypatch):
    real = validation.update_norm

    def breaks_on_nine(arrays, reference):
        if float(arrays["w"].numpy()[0]) == 9.0:
            raise RuntimeError("a check broke")
        return real(arrays, reference)

    monkeypatch.setattr(validation, "update_norm", breaks_on_nine)
    start = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    replies = [_reply(1, [1.0, 1.0]), _reply(2, [9.0, 9.0]), _reply(3, [2.0, 2.0])]
    out = validation.screen_train(replies, start, validation.Limits())
    assert [m.metadata.src_node_id for m in out.accepted] == [1, 3]
    assert [(r["node"], r["class"]) for r in out.rejected] == [(2, "error")]
    assert "a check broke" in out.rejected[0]["reason"]


def test_num_examples_above_max_site_weight_is_capped_in_place():
    start = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    replies = [_reply(1, [1.0, 1.0], 50), _reply(2, [1.0, 1.0], 5000)]
    out = validation.screen_train(replies, start, validation.Limits(max_weight=100))
    assert [m.content["metrics"]["num-examples"] for m in out.accepted] == [50, 100]
