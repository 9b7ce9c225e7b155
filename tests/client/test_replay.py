"""A round asked again (a coordinator's resume) gets the reply already sent, and spends no ε a second time;
what the replay cannot answer never takes the run past its target."""

from dataclasses import replace

import pytest
import torch

from client.site import Site
from common.config import RunConfig, SiteConfig
from common.errors import PrivacyBudgetExceeded
from common.ledger import PrivacyLedger
from common.models import build_model
from common.weights import to_record


def _steps(state, run_id="run") -> int:
    return sum(n for _, _, n in PrivacyLedger(state).history(run_id))


def _same(a, b) -> bool:
    x, y = a.to_torch_state_dict(), b.to_torch_state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_same_round_with_the_same_weights_is_answered_again_without_training(hospitals, tmp_path):
    run = RunConfig(num_server_rounds=5, local_epochs=1, batch_size=8, image_size=32, dp_target_delta=1e-3)
    state = tmp_path / "state"  # 5 rounds planned: room for the extra trainings below

    def site(cfg=run):
        return Site(cfg, SiteConfig(str(hospitals / "site-000"), str(state), "cpu"))

    start = to_record(build_model("classification", "cnn", image_size=32))
    w1, _ = site().train(start, 1, "run")
    w2, m2 = site().train(w1, 2, "run")
    per_round = _steps(state) // 2

    # the coordinator stopped after sending round 2, resumed from round 1's checkpoint: round 2 again
    resumed = replace(run, resume=True, round_timeout=30.0, site_wait=10.0, min_available_sites=1)
    again, m_again = site(resumed).train(w1, 2, "run")
    assert _same(again, w2)
    assert _steps(state) == 2 * per_round  # nothing more spent
    assert m_again["epsilon"] == pytest.approx(m2["epsilon"], rel=1e-12)
    assert "train-loss" not in m_again and "train-loss" not in m2  # a DP reply sends no loss

    # anything else is a new request and trains: other weights, another round, a setting that trains differently
    other = to_record(build_model("classification", "cnn", image_size=32))
    assert not _same(site().train(other, 2, "run")[0], w2)
    assert _steps(state) == 3 * per_round
    site(replace(run, learning_rate=0.01)).train(w1, 2, "run")
    assert _steps(state) == 4 * per_round
    site().train(w1, 2, "another-run")
    assert _steps(state, "another-run") == per_round


def test_a_round_the_replay_cannot_answer_is_refused_rather_than_overshoot_the_runs_target(hospitals, tmp_path):
    run = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, image_size=32, dp_target_delta=1e-3)
    site = Site(run, SiteConfig(str(hospitals / "site-000"), str(tmp_path / "state"), "cpu"))
    start = to_record(build_model("classification", "cnn", image_size=32))
    w1, _ = site.train(start, 1, "run")
    _, m2 = site.train(w1, 2, "run")
    assert m2["epsilon"] <= run.dp_target_epsilon + 0.01
    spent = _steps(tmp_path / "state")
    other = to_record(build_model("classification", "cnn", image_size=32))  # round 2 again, other weights
    with pytest.raises(PrivacyBudgetExceeded, match="over the run's target") as refused:
        site.train(other, 2, "run")
    assert refused.value.would_be > run.dp_target_epsilon
    assert _steps(tmp_path / "state") == spent  # refused before any step
