"""A site's accountant (site policy `accountant`): PRV's ε is Opacus's PRVAccountant's for the same history,
composed across runs in the ledger; the noise search uses the same accountant, so the target holds by it."""

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from client.site import Site
from common import privacy, site_policy
from common.config import RunConfig, SiteConfig
from common.errors import ConfigError
from common.ledger import Entry, PrivacyLedger, statement
from common.models import build_model
from common.site_policy import SitePolicy
from common.weights import to_record

# two runs at one site: different noise and sample rates, the first run's pair again after the second's
HISTORY = [(1.1, 0.25, 12), (1.1, 0.25, 12), (0.9, 0.125, 24), (1.1, 0.25, 12)]


def _stepped(accountant, history, delta):
    """Opacus's accountant stepped once per recorded step, as a PrivacyEngine steps it."""
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


def test_prv_epsilon_is_opacus_prv_accountant_for_the_same_history():
    delta = 1e-4
    ours = privacy.epsilon(HISTORY, delta, "prv")
    assert ours == pytest.approx(_stepped(PRVAccountant(), HISTORY, delta), rel=1e-9)
    assert ours < privacy.epsilon(HISTORY, delta, "rdp") == pytest.approx(_stepped(RDPAccountant(), HISTORY, delta))
    assert privacy.epsilon(HISTORY, delta) == privacy.epsilon(HISTORY, delta, "rdp")  # RDP stays the default
    with pytest.raises(ConfigError, match=r"rdp \| prv"):
        privacy.epsilon(HISTORY, delta, "gdp")
    assert set(privacy.ACCOUNTANTS) == set(site_policy.ACCOUNTANTS)  # the policy names what privacy offers


def test_the_ledger_composes_runs_with_its_accountant(tmp_path):
    book = PrivacyLedger(tmp_path, accountant="prv")
    for i, (sigma, q, steps) in enumerate(HISTORY):
        book.append(Entry("run-a" if i != 2 else "run-b", i + 1, sigma, q, steps, 1e-4, [(sigma, q, steps)]))
    assert book.total_epsilon() == pytest.approx(_stepped(PRVAccountant(), HISTORY, 1e-4), rel=1e-9)
    assert PrivacyLedger(tmp_path).total_epsilon() == pytest.approx(_stepped(RDPAccountant(), HISTORY, 1e-4))
    shown = statement(book)
    assert shown["accountant"] == "prv" and shown["epsilon-total"] == pytest.approx(book.total_epsilon(), rel=1e-12)


def test_the_noise_search_meets_the_target_by_the_same_accountant(tmp_path):
    q, steps, target, delta = 0.25, 96, 8.0, 1e-4
    rdp = privacy.noise_multiplier(target, delta, q, steps, tmp_path, "rdp")
    privacy.forget()
    prv = privacy.noise_multiplier(target, delta, q, steps, tmp_path, "prv")
    assert prv < rdp  # the tighter bound buys less noise for the same ε
    assert target - privacy.SEARCH_TOLERANCE <= privacy.epsilon([(prv, q, steps)], delta, "prv") <= target
    assert privacy.epsilon([(prv, q, steps)], delta, "rdp") > target  # ... which RDP could not certify
    privacy.forget()
    assert privacy.noise_multiplier(target, delta, q, steps, tmp_path, "prv") == prv  # cached apart from RDP's
    assert privacy.noise_multiplier(target, delta, q, steps, tmp_path, "rdp") == rdp


def test_a_site_choosing_prv_spends_its_target_by_prv(hospitals, tmp_path):
    torch.manual_seed(0)
    run = RunConfig(num_server_rounds=2, local_epochs=1, batch_size=8, image_size=32, dp_target_delta=1e-3)
    policy = SitePolicy(accountant="prv", dp_delta=1e-3)
    site = Site(run, SiteConfig(str(hospitals / "site-000"), str(tmp_path), "cpu", 100.0), own_policy=policy)
    arrays = to_record(build_model("classification", "cnn", image_size=32))
    for server_round in (1, 2):
        _, reply = site.train(arrays, server_round, "study")
    history = PrivacyLedger(tmp_path).history()
    assert reply["epsilon"] == pytest.approx(_stepped(PRVAccountant(), history, 1e-3), rel=1e-9)
    assert run.dp_target_epsilon - privacy.SEARCH_TOLERANCE <= reply["epsilon"] <= run.dp_target_epsilon
    n = len(site.data()[0])
    rdp_plan = privacy.plan(run.dp_target_epsilon, 1e-3, n, run.batch_size, run.local_epochs, run.num_server_rounds,
                            run.dp_max_grad_norm)
    assert reply["noise-multiplier"] < rdp_plan.noise_multiplier
    with pytest.raises(ConfigError, match=r"rdp \| prv"):
        SitePolicy.from_mapping({"accountant": "gdp"})
