"""Evaluation is an oracle on a site's validation images: the site answers a run only its allowance
(`evaluations-per-round` per trained round, plus one), never on a split below its minimum, and only
rounded metrics; a DP reply sends no training loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch.utils.data import TensorDataset

from client import app as client_app
from client.site import Site
from common import privacy, training
from common.config import RunConfig, SiteConfig
from common.flower_compat.engine import acting_as
from common.models import build_model
from common.protocol import POLICY_REFUSED, REFUSED_SETTING, STATUS
from common.site_policy import SitePolicy, SitePolicyRefused
from common.weights import to_record

RUN = RunConfig(dp_enabled=False, num_server_rounds=3, local_epochs=1, batch_size=8, image_size=32)


def _images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 2, (n,), generator=g))


@pytest.fixture
def split(monkeypatch):
    """A site's (train, validation) tensors, set per test; every evaluation actually run is counted."""
    held = {"train": _images(16, 0), "val": _images(25, 1)}
    monkeypatch.setattr(Site, "data", lambda self: (held["train"], held["val"]))
    calls = []
    real = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    held["calls"] = calls
    return held


def _node_config(tmp_path, **policy) -> dict:
    return {"data-path": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"), "device": "cpu",
            "allow-no-dp": True, **policy}


def _ask(kind: str, node_config: dict, server_round: int, run: RunConfig = RUN) -> Message:
    config = ConfigRecord({**run.to_mapping(), "server-round": server_round})
    arrays = to_record(build_model("classification", "cnn", image_size=32))
    with acting_as(7, 0, 1):
        msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=5, message_type=kind)
    context = Context(run_id=7, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    with acting_as(7, 5, 1):
        reply = client_app.app(msg, context)
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    return reply


def _answered(reply: Message) -> bool:
    if STATUS in reply.content:
        assert dict(reply.content[STATUS]) == {STATUS: POLICY_REFUSED, REFUSED_SETTING: "evaluations-per-round"}
        return False
    return True


def test_a_hundred_evaluations_in_a_run_get_only_the_sites_allowance(tmp_path, split):
    node_config = _node_config(tmp_path)
    assert [_answered(_ask("evaluate", node_config, 0)) for _ in range(2)] == [True, False]  # the start model
    for server_round in (1, 2, 2):  # round 2 asked twice earns one evaluation, not two
        _ask("train", node_config, server_round)
    answered = sum(_answered(_ask("evaluate", node_config, 2)) for _ in range(100))
    assert answered == 2 and len(split["calls"]) == 3  # 1 + 2 trained rounds in all; refused: nothing evaluated


def test_the_site_sets_the_allowance_and_each_run_has_its_own(tmp_path, split):
    node_config = _node_config(tmp_path, **{"evaluations-per-round": 3})
    assert sum(_answered(_ask("evaluate", node_config, 0)) for _ in range(5)) == 3
    other_run = replace(RUN, run_name="another-study")
    assert sum(_answered(_ask("evaluate", node_config, 0, other_run)) for _ in range(5)) == 3


def test_a_validation_split_below_the_sites_minimum_is_refused_unevaluated(tmp_path, split):
    split["val"] = _images(19, 2)
    reply = _ask("evaluate", _node_config(tmp_path, **{"min-validation-images": 20}), 0)
    assert dict(reply.content[STATUS]) == {STATUS: POLICY_REFUSED, REFUSED_SETTING: "min-validation-images"}
    assert not split["calls"]
    split["val"] = _images(20, 2)
    assert "metrics" in _ask("evaluate", _node_config(tmp_path / "b", **{"min-validation-images": 20}), 0).content


def test_evaluate_metrics_leave_the_site_rounded(tmp_path, split):
    site = Site(replace(RUN, fine_tune_epochs=1), SiteConfig(str(tmp_path), str(tmp_path / "s"), "cpu"),
                own_policy=SitePolicy(allow_no_dp=True))  # fine-tuning is training without DP
    reply = site.evaluate(to_record(build_model("classification", "cnn", image_size=32)), "r")
    scores = {k: v for k, v in reply.items() if k not in ("num-examples", "site-weight", "auc-weight")}
    assert {"loss", "accuracy", "personal-loss"} <= set(scores)
    assert all(v == round(v, 3) for v in scores.values()), scores
    assert any(v != round(v, 2) for v in scores.values())  # 3 decimals, not fewer
    with pytest.raises(SitePolicyRefused):
        Site(RUN, site.config, own_policy=SitePolicy(min_validation_images=26)).evaluate(
            to_record(build_model("classification", "cnn", image_size=32)), "r2")


def test_a_dp_reply_sends_no_training_loss(tmp_path, hospitals, split, monkeypatch):
    monkeypatch.setattr(privacy, "_KNOWN", {})
    monkeypatch.setattr(privacy, "_search", lambda *a: 1.5)
    run = replace(RUN, dp_enabled=True, dp_target_delta=1e-3)
    _, metrics = Site(run, SiteConfig(str(hospitals / "site-000"), str(tmp_path / "s"), "cpu"),
                      own_policy=SitePolicy(dp_delta=1e-3)).train(
        to_record(build_model("classification", "cnn", image_size=32)), 1, "r")
    assert "epsilon" in metrics and "train-loss" not in metrics
