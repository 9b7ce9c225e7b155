import copy
import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from client.site import Site
from common import privacy
from common.config import RunConfig, SiteConfig
from common.errors import ConfigError
from common.ledger import PrivacyLedger
from common.models import build_model
from common.weights import to_record


def _batch(n=6, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g)


def _dp_step(model, x, y, clip, lr):
    dp = privacy.DPPlan(noise_multiplier=0.0, sample_rate=1.0, max_grad_norm=clip, delta=1e-5, planned_steps=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    _, module, optimizer, _ = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=lr), loader, dp)
    optimizer.zero_grad()
    F.cross_entropy(module(x), y).backward()
    optimizer.step()


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_no_noise_and_no_clipping_equals_plain_sgd():
    torch.manual_seed(0)
    model = build_model("classification", "cnn")
    plain = copy.deepcopy(model)
    x, y = _batch()
    _dp_step(model, x, y, clip=1e6, lr=0.1)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    F.cross_entropy(plain(x), y).backward()
    opt.step()
    assert torch.allclose(_flat(model), _flat(plain), atol=1e-6)


def test_each_per_sample_gradient_is_clipped():
    torch.manual_seed(0)
    model = build_model("classification", "cnn")
    reference = copy.deepcopy(model)
    x, y = _batch()
    clip, lr = 1e-3, 1.0
    clipped, norms = [], []
    for i in range(len(y)):  # per-sample gradients by hand, one sample at a time
        reference.zero_grad()
        F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.flatten() for p in reference.parameters()])
        norms.append(g.norm().item())
        clipped.append(g * min(1.0, clip / (g.norm().item() + 1e-6)))
    assert min(norms) > 100 * clip  # the bound really binds for every sample
    expected = torch.stack(clipped).mean(0)
    _dp_step(model, x, y, clip=clip, lr=lr)
    applied = torch.cat([p.grad.flatten() for p in model.parameters()])  # what the step used
    assert applied.norm() <= clip * 1.0001
    assert torch.allclose(applied, expected, rtol=1e-4, atol=1e-10)


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ConfigError, match="dp-target-delta"):
        privacy.plan(8.0, 0.05, num_examples=100, batch_size=10, epochs_per_round=1, rounds=1, max_grad_norm=1.0)


def test_epsilon_is_cumulative_and_equals_opacus_accountant(hospitals, tmp_path):
    rounds = 3
    run = RunConfig(num_server_rounds=rounds, local_epochs=1, batch_size=8, image_size=32, dp_target_delta=1e-3)
    site = Site(run, SiteConfig(str(hospitals / "site-000"), str(tmp_path / "state"), "cpu"))
    arrays = to_record(build_model("classification", "cnn", image_size=32))
    epsilons = []
    for server_round in range(1, rounds + 1):
        _, metrics = site.train(arrays, server_round, run_id="run-a")
        epsilons.append(metrics["epsilon"])
    n = metrics["num-examples"]
    steps_per_round = math.ceil(n / run.batch_size) * run.local_epochs
    sigma = privacy.plan(run.dp_target_epsilon, run.dp_target_delta, n, run.batch_size, run.local_epochs,
                         rounds, run.dp_max_grad_norm).noise_multiplier
    for r, eps in enumerate(epsilons, start=1):
        accountant = RDPAccountant()
        for _ in range(steps_per_round * r):
            accountant.step(noise_multiplier=sigma, sample_rate=1 / math.ceil(n / run.batch_size))
        assert eps == pytest.approx(accountant.get_epsilon(run.dp_target_delta), rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2] <= run.dp_target_epsilon * 1.01
    assert epsilons[2] == pytest.approx(run.dp_target_epsilon, rel=0.05)  # the plan spends the budget
    # another run starts its own history; this run's stays on disk
    _, other = site.train(arrays, 1, run_id="run-b")
    assert other["epsilon"] == pytest.approx(epsilons[0])
    assert sum(n for _, _, n in PrivacyLedger(tmp_path / "state").history("run-a")) == steps_per_round * rounds


def test_dp_noise_is_not_derivable_from_the_servers_seed(hospitals, tmp_path):
    """Same run config and weights: a real site draws fresh noise and batches for every training, even
    from the same state folder; only a virtual site (simulation: `index` set) repeats, by design."""
    run = RunConfig(num_server_rounds=1, local_epochs=1, batch_size=8, image_size=32, dp_target_delta=1e-3)
    arrays = to_record(build_model("classification", "cnn", image_size=32))

    def update(state, run_id="r", index=None):
        # two runs of ε 8 on one site's data: past the default budget of 10, so the test names a larger one
        site = Site(run, SiteConfig(str(hospitals / "site-000"), str(state), "cpu", privacy_budget=100.0), index)
        new, _ = site.train(arrays, 1, run_id=run_id)
        return torch.cat([v.flatten() for v in new.to_torch_state_dict().values()])

    # (another run name: the same run's round asked again would be answered from client/replay.py)
    a, b, a_again = update(tmp_path / "a"), update(tmp_path / "b"), update(tmp_path / "a", run_id="r2")
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, a_again)  # a new run with the same seed: other noise, other batches
    assert oct((tmp_path / "a" / "site-secret").stat().st_mode)[-3:] == "600"
    virtual = update(tmp_path / "v", index=0)
    assert torch.equal(virtual, update(tmp_path / "v", run_id="r2", index=0))  # simulation repeats


def test_a_real_site_seeds_every_training_afresh_and_a_virtual_site_from_the_run(tmp_path):
    """The seed itself: never the same twice at a real site; a function of (seed, round, site) in simulation."""
    run = RunConfig(seed=7)
    real = Site(run, SiteConfig(str(tmp_path), str(tmp_path / "state"), "cpu"))
    seeds = {real._generator(1).initial_seed() for _ in range(5)}
    assert len(seeds) == 5
    virtual = Site(run, SiteConfig(str(tmp_path), str(tmp_path / "v"), "cpu"), index=2)
    assert virtual._generator(1).initial_seed() == virtual._generator(1).initial_seed()
    assert virtual._generator(1).initial_seed() != virtual._generator(2).initial_seed()


def test_added_noise_has_the_expected_standard_deviation():
    """Zero gradients in, so the step is pure noise: std sigma*C/B per coordinate (Opacus's mean over the batch)."""
    torch.manual_seed(1234)
    model = torch.nn.Linear(1000, 20, bias=False)  # 20,000 noise draws
    torch.nn.init.zeros_(model.weight)
    batch, sigma, clip = 16, 1.3, 0.7
    x, y = torch.zeros(batch, 1000), torch.zeros(batch, dtype=torch.long)  # zero input: zero gradient
    dp = privacy.DPPlan(noise_multiplier=sigma, sample_rate=1.0, max_grad_norm=clip, delta=1e-5, planned_steps=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    _, module, optimizer, _ = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader, dp)
    optimizer.zero_grad()
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    noise = -model.weight.detach().flatten().double()
    expected = sigma * clip / batch
    n = noise.numel()
    # sample std of n normals: relative standard error 1/sqrt(2n) = 0.5%; allow 5 of them
    assert noise.std().item() == pytest.approx(expected, rel=5 / math.sqrt(2 * n))
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(n)


def test_noise_multiplier_is_searched_once_per_site_and_a_weaker_cached_value_is_refused(tmp_path, monkeypatch):
    args = (8.0, 1e-4, 0.2, 60)
    privacy.forget()
    sigma = privacy.noise_multiplier(*args, state=tmp_path)
    assert sigma == privacy._search(*args)  # what Opacus's own search answers
    privacy.forget()  # a new process (a deployment round, another Ray worker) reads the site's file
    monkeypatch.setattr(privacy, "_search", lambda *a: pytest.fail("searched again"))
    assert privacy.noise_multiplier(*args, state=tmp_path) == sigma
    monkeypatch.undo()

    cache = tmp_path / privacy.NOISE_CACHE
    cache.write_text(cache.read_text().replace(repr(sigma), repr(sigma / 2)))  # edited: half the noise
    privacy.forget()
    assert privacy.epsilon([(sigma / 2, 0.2, 60)], 1e-4) > 8.0
    assert privacy.noise_multiplier(*args, state=tmp_path) == sigma  # refused, searched again
    cache.write_text(cache.read_text().replace(repr(sigma), repr(sigma * 2)))  # edited: twice the noise
    privacy.forget()
    assert privacy.noise_multiplier(*args, state=tmp_path) == sigma  # refused too: not what was planned
    cache.write_text("not json")
    privacy.forget()
    assert privacy.noise_multiplier(*args, state=tmp_path) == sigma
