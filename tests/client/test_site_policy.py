"""The site decides what protects its patients: a run asking for less (or for more memory than the site
allows) is refused with a status reply and a log line, its ledger byte-identical; every reply leaves the
site holding only what common/protocol.py lists."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import app as client_app
from client.site import Site, site_from_context
from common import privacy
from common.config import RunConfig, SiteConfig
from common.errors import ConfigError
from common.flower_compat.engine import acting_as
from common.ledger import LEDGER_FILE, PrivacyLedger
from common.models import build_model
from common.protocol import POLICY_REFUSED, REFUSED_SETTING, STATUS
from common.site_policy import DEFAULT_PRIVACY_BUDGET, SitePolicy, SitePolicyRefused, split_node_config
from common.weights import to_record

RUN = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, image_size=32, dp_target_delta=1e-3)


@pytest.fixture(autouse=True)
def _fast_noise_search(monkeypatch):
    """Opacus's 3-5 s search answered at once: any noise multiplier will do for these checks."""
    monkeypatch.setattr(privacy, "_KNOWN", {})
    monkeypatch.setattr(privacy, "_search", lambda *a: 1.5)


def _site(hospitals: Path, state: Path, run: RunConfig = RUN, **policy) -> Site:
    return Site(run, SiteConfig(str(hospitals / "site-000"), str(state), "cpu"), own_policy=SitePolicy(**policy))


def _arrays() -> ArrayRecord:
    return to_record(build_model("classification", "cnn", image_size=32))


@pytest.mark.parametrize(("setting", "run", "policy"), [
    ("dp-enabled", replace(RUN, dp_enabled=False), {}),
    ("dp-target-delta", RUN, {"dp_delta": 1e-4}),
    ("dp-target-delta", replace(RUN, dp_target_delta=0.05), {}),  # above the automatic 1/(10·N)
    ("val-fraction", replace(RUN, val_fraction=0.5), {}),
    ("dp-target-epsilon", replace(RUN, dp_target_epsilon=50.0), {}),
    ("dp-target-epsilon", RUN, {"min_noise_multiplier": 2.0}),  # noise 1.5 is below the site's floor
])
def test_a_run_asking_for_less_protection_is_refused_with_the_ledger_untouched(hospitals, tmp_path, setting, run,
                                                                               policy):
    _site(hospitals, tmp_path).train(_arrays(), 1, "earlier")  # a ledger with one round in it
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(SitePolicyRefused) as refusal:
        _site(hospitals, tmp_path, run, **policy).train(_arrays(), 1, "greedy")
    assert refusal.value.setting == setting
    assert (tmp_path / LEDGER_FILE).read_bytes() == before


def test_the_site_allows_non_dp_training_only_when_it_says_so(hospitals, tmp_path):
    _, metrics = _site(hospitals, tmp_path, replace(RUN, dp_enabled=False), allow_no_dp=True).train(_arrays(), 1, "r")
    assert "epsilon" not in metrics and not (tmp_path / LEDGER_FILE).exists()


def test_the_total_is_stated_at_the_sites_delta(hospitals, tmp_path):
    _, metrics = _site(hospitals, tmp_path, dp_delta=1e-2).train(_arrays(), 1, "r")
    history = PrivacyLedger(tmp_path).history()
    assert metrics["epsilon-total"] == pytest.approx(privacy.epsilon(history, 1e-2))
    assert metrics["epsilon"] == pytest.approx(privacy.epsilon(history, RUN.dp_target_delta))  # the run's, at its δ


def test_the_validation_split_is_the_sites_whatever_the_run_asks(hospitals, tmp_path):
    site = _site(hospitals, tmp_path / "a", val_fraction=0.5, split_seed=3)
    other_seed = replace(site, run=replace(RUN, seed=99, val_fraction=0.5))
    assert len(site.data()[1]) == len(other_seed.data()[1])
    assert len(site.data()[1]) != len(_site(hospitals, tmp_path / "b").data()[1])  # 0.5 vs the default 0.2


@pytest.mark.parametrize(("setting", "value"), [("image-size", 1024), ("num-classes", 10**9),
                                                ("batch-size", 10**7)])
def test_a_request_above_a_cap_is_refused_before_anything_is_read(hospitals, tmp_path, monkeypatch, caplog,
                                                                   setting, value):
    monkeypatch.setattr(Site, "data", lambda self: pytest.fail("read the data"))
    run = RunConfig.from_mapping({**RUN.to_mapping(), setting: value})
    node_config = {"data-path": str(hospitals / "site-000"), "state-dir": str(tmp_path / "s"), "device": "cpu"}
    for kind in ("train", "evaluate"):
        with caplog.at_level(logging.WARNING, logger="client.app"):
            reply = _answer(kind, run, node_config)
        assert dict(reply.content[STATUS]) == {STATUS: POLICY_REFUSED, REFUSED_SETTING: setting}
        assert f"run setting '{setting}': {value} is above this site's cap" in caplog.text
    assert not (tmp_path / "s" / "cache").exists()


def test_the_node_config_sets_the_policy_and_the_site_config(hospitals, tmp_path):
    node_config = {"data-path": str(hospitals / "site-000"), "state-dir": str(tmp_path), "device": "cpu",
                   "privacy-budget": 5.0, "dp-delta": 1e-5, "max-image-size": 64, "allow-no-dp": True}
    site = site_from_context(RUN, node_config)
    assert site.config.privacy_budget == 5.0
    assert site.policy == SitePolicy(dp_delta=1e-5, max_image_size=64, allow_no_dp=True)
    with pytest.raises(ConfigError, match="max-image-size"):
        split_node_config({"max-image-size": 8})
    with pytest.raises(ConfigError, match="unknown setting 'max-imge-size'"):
        site_from_context(RUN, {**node_config, "max-imge-size": 64})


def test_a_virtual_site_accepts_the_runs_own_settings(tmp_path):
    run = RunConfig(dp_enabled=False, image_size=512, val_fraction=0.3, seed=4, data_root=str(tmp_path))
    policy = site_from_context(run, {"partition-id": 1}).policy
    policy.check_training(run)
    assert (policy.val_fraction, policy.split_seed) == (0.3, 4)
    with pytest.raises(SitePolicyRefused):
        policy.check_training(replace(run, image_size=1024))  # what the run asks, not more


def test_a_reply_holds_only_what_the_protocol_lists(hospitals, tmp_path, monkeypatch, caplog):
    def leaky(self, arrays, server_round, run_id, correction=None):
        return arrays, {"num-examples": 3, "site-weight": 1, "patient-name": 1.0}

    monkeypatch.setattr(Site, "train", leaky)
    node_config = {"data-path": str(hospitals / "site-000"), "state-dir": str(tmp_path), "device": "cpu"}
    with caplog.at_level(logging.WARNING, logger="client.app"):
        reply = _answer("train", RUN, node_config)
    assert dict(reply.content["metrics"]) == {"num-examples": 3, "site-weight": 1}
    assert "dropped ['patient-name']" in caplog.text
    content = RecordDict({"metrics": MetricRecord({"loss": 1.0, "mrn": 5.0}), "extra": ConfigRecord({"a": "b"})})
    kept = client_app.whitelisted(content, "evaluate")
    assert list(kept) == ["metrics"] and dict(kept["metrics"]) == {"loss": 1.0}


def _answer(kind: str, run: RunConfig, node_config: dict) -> Message:
    config = ConfigRecord({**run.to_mapping(), "server-round": 1})
    with acting_as(7, 0, 1):
        msg = Message(RecordDict({"arrays": _arrays(), "config": config}), dst_node_id=5, message_type=kind)
    context = Context(run_id=7, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    with acting_as(7, 5, 1):
        reply = client_app.app(msg, context)
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    return reply


def test_the_decode_cache_keeps_at_most_the_sites_number_of_sets(hospitals, tmp_path, monkeypatch):
    from client import site as site_module

    monkeypatch.setattr(site_module, "_MEMO", {})
    for size in (16, 24, 32):
        _site(hospitals, tmp_path, replace(RUN, image_size=size), decode_caches=2).data()
    held = {p.name: p.stat().st_size for p in (tmp_path / "cache").glob("decoded-*.npz")}
    assert len(held) == 2 and all(size > 0 for size in held.values())  # the oldest set is gone
    monkeypatch.setattr(site_module, "_MEMO", {})
    train, _ = _site(hospitals, tmp_path, replace(RUN, image_size=16), decode_caches=2).data()  # evicted: decoded again
    assert train.tensors[0].shape[-1] == 16


def test_fine_tuning_without_dp_is_refused_at_a_dp_only_site_before_any_image_is_read(hospitals, tmp_path,
                                                                                     monkeypatch):
    run = replace(RUN, fine_tune_epochs=1)
    read = []
    monkeypatch.setattr(Site, "data", lambda self: read.append(1))
    with pytest.raises(SitePolicyRefused) as refusal:
        _site(hospitals, tmp_path, run).evaluate(_arrays(), "personal")
    assert refusal.value.setting == "fine-tune-epochs" and not read
    monkeypatch.undo()
    allowed = _site(hospitals, tmp_path / "b", run, allow_no_dp=True, min_validation_images=0)
    assert "personal-loss" in allowed.evaluate(_arrays(), "ok")


def test_a_real_site_without_a_named_budget_gets_the_conservative_default(hospitals, tmp_path):
    """A hand-written node config (no `fedhosp client`) must not mean an unlimited ε."""
    node_config = {"data-path": str(hospitals / "site-000"), "state-dir": str(tmp_path), "device": "cpu"}
    assert site_from_context(replace(RUN, site_privacy_budget=500.0), node_config).budget == DEFAULT_PRIVACY_BUDGET
    named = site_from_context(RUN, {**node_config, "privacy-budget": 3.0})
    assert named.budget == 3.0
