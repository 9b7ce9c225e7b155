"""Sample-level DP-SGD with Opacus, with an accountant that survives between rounds.

Flower recreates the ClientApp for every message, and Flower's own Opacus example
builds a fresh PrivacyEngine each round, so its ε restarts at zero every round.
Here each round's engine starts empty and what it spent is appended to the site's
ledger (`common.ledger`); ε is always Opacus's RDP accountant over the ledger's
concatenated histories, for one run or for every run on the site's data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader

from common.errors import ConfigError
from common.models import grad_sample_mode
from common.site_state import SiteState

ACCOUNTANT = "rdp"  # the default; a site may choose PRV (site policy `accountant`), see `epsilon`
ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}
NOISE_CACHE = "noise-multipliers.json"  # in a site's state folder: see noise_multiplier
SEARCH_TOLERANCE = 0.01  # Opacus's get_noise_multiplier default: its answer spends within this of the target
History = list[tuple[float, float, int]]  # Opacus: (noise_multiplier, sample_rate, steps)

# Opacus's hooks on the first layer make torch warn on every backward pass that the
# input needs no gradient: expected (images never need one), so not worth a line per step.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


@dataclass(frozen=True)
class DPPlan:
    """The noise that spends exactly the run's target ε if the site trains every round."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    delta: float
    planned_steps: int
    steps_per_round: int = 0
    # Distributed DP (dp-mode = distributed): the released SecAgg+ sum holds the noise of at least
    # `shares` sites, so each site adds 1/sqrt(shares) of it; `noise_multiplier` is the sum's, the one accounted.
    shares: int = 1
    calibrated: bool = True  # sigma searched for the run's target ε (local); False: the coordinator's (distributed)

    def round_history(self) -> History:
        """What one full round will add to the accountant: a site checks its budget against it first."""
        return [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]

    @property
    def added_noise_multiplier(self) -> float:
        """The noise this site adds (std, in units of max-grad-norm): the whole of it, or its share of the sum's."""
        return self.noise_multiplier / math.sqrt(self.shares)


def plan(
    target_epsilon: float,
    delta: float,
    num_examples: int,
    batch_size: int,
    epochs_per_round: int,
    rounds: int,
    max_grad_norm: float,
    state: SiteState | Path | None = None,
    accountant: str = ACCOUNTANT,
) -> DPPlan:
    _check_delta(delta, num_examples)
    steps_per_epoch = math.ceil(num_examples / batch_size)  # Opacus's Poisson loader length
    sample_rate = 1.0 / steps_per_epoch
    steps = steps_per_epoch * epochs_per_round * rounds
    sigma = noise_multiplier(target_epsilon, delta, sample_rate, steps, state, accountant)
    return DPPlan(sigma, sample_rate, max_grad_norm, delta, steps, steps_per_epoch * epochs_per_round)


def _check_delta(delta: float, num_examples: int) -> None:
    if delta >= 1.0 / num_examples:
        raise ConfigError(
            f"dp-target-delta = {delta:g} is not below 1/n = 1/{num_examples} for this site: "
            "lower dp-target-delta (delta must be much smaller than 1/n)"
        )


def distributed_plan(sum_noise_multiplier: float, threshold: int, delta: float, num_examples: int,
                     batch_size: int, rounds: int, max_grad_norm: float) -> DPPlan:
    """One DP-SGD step per round at this site's own Poisson rate q = 1/ceil(n / batch-size), its Gaussian
    noise 1/sqrt(threshold) of the sum's: any `threshold` sites' shares add up to the sum's noise multiplier.

    Why the sum is one central DP-SGD step: site k sends Δ_k = -lr (Σ clip + z_k) / B_k (Opacus's step,
    B_k = its expected batch q·n) weighted by w_k = B_k, so the server's Σ w_k Δ_k / Σ w_k is
    -lr (Σ_all clip + Σ z_k) / Σ B_k, the pooled expected batch's step, with std(Σ z_k) >= sigma·C."""
    _check_delta(delta, num_examples)
    sample_rate = 1.0 / math.ceil(num_examples / batch_size)  # Opacus's Poisson rate, as in `plan`
    return DPPlan(sum_noise_multiplier, sample_rate, max_grad_norm, delta, rounds, 1, shares=threshold,
                  calibrated=False)


def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     state: SiteState | Path | None = None, accountant: str = ACCOUNTANT) -> float:
    """Opacus's noise multiplier for these four numbers, kept in memory and, given a site's folder, in a file there.

    The search takes 3-5 s and every round of a run asks it the same question, but in
    deployment every round is a new process and in simulation a site lands on any of the
    Ray workers: uncached, it was 70% of a simulated site's time. A value read from the file is
    used only if Opacus's accountant confirms (one ε evaluation, not a search) that it spends
    the target within the search's tolerance, so a stale or edited file can neither weaken the
    noise nor silently add more than planned.
    """
    key = json.dumps([target_epsilon, delta, sample_rate, steps, *([accountant] if accountant != ACCOUNTANT else [])])
    if key in _KNOWN:
        return _KNOWN[key]
    site = SiteState.at(state) if state is not None else None
    known = _read_cache(site)
    cached = known.get(key)
    if isinstance(cached, float) and cached > 0 and \
            target_epsilon - SEARCH_TOLERANCE <= epsilon([(cached, sample_rate, steps)], delta, accountant) \
            <= target_epsilon:
        sigma = cached  # what the search would answer: within its tolerance below the target
    else:
        sigma = _search(target_epsilon, delta, sample_rate, steps, accountant)
        if site is not None:
            _write_cache(site, {**known, key: sigma})
    _KNOWN[key] = sigma
    return sigma


_KNOWN: dict[str, float] = {}  # this process's answers (searched or confirmed)


def forget() -> None:
    """For benchmarks that must start as a fresh process does."""
    _KNOWN.clear()


def _read_cache(state: SiteState | None) -> dict[str, object]:
    if state is None:
        return {}
    try:
        known = state.read_json(NOISE_CACHE)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_cache(state: SiteState, known: dict[str, object]) -> None:
    """Atomically (a reader never sees half a file); a cache that cannot be written is only slower."""
    with contextlib.suppress(OSError):
        state.write_json(NOISE_CACHE, known)


def _search(target_epsilon: float, delta: float, sample_rate: float, steps: int,
            accountant: str = ACCOUNTANT) -> float:
    return get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=_checked(accountant),
    )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    dp: DPPlan,
) -> tuple[PrivacyEngine, nn.Module, torch.optim.Optimizer, DataLoader]:
    """Wrap once per round with a fresh accountant (the round's steps only); Poisson sampling on;
    per-sample gradients by the model's own grad-sample mode (common.models.grad_sample_mode)."""
    with warnings.catch_warnings():
        # Opacus warns on every engine that its cryptographically secure RNG is off.
        # Known and deliberate for now: see the note on secure_mode in README.md.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.added_noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=grad_sample_mode(model),
        )
    return engine, module, optimizer, loader


def epsilon(history: History, delta: float, accountant: str = ACCOUNTANT) -> float:
    """ε spent by `history`, computed by Opacus's own RDP accountant (or its PRV accountant, `prv`).

    Opacus's RDP for a fixed (noise multiplier, sample rate) is linear in the steps, so the
    entries sharing a pair are handed over as one, their steps added: one RDP evaluation
    (~0.3 s over Opacus's alphas) per distinct pair instead of one per ledger entry, where a
    site's ledger gains an entry every round of every run. PRV composes the same way: n1 then
    n2 self-compositions of one mechanism are its n1 + n2 self-composition (the privacy loss
    variables add); Opacus's FFT gives the two forms within 1e-9 in ε, and one PRV per distinct
    pair keeps its cost (~0.5 s a pair, several seconds for a history of many pairs) bounded.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, n in history:
        if int(n) > 0:
            merged[(float(sigma), float(rate))] = merged.get((float(sigma), float(rate)), 0) + int(n)
    if not merged:
        return 0.0
    return _epsilon(tuple((sigma, rate, n) for (sigma, rate), n in merged.items()), float(delta), _checked(accountant))


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """Kept per process: a site asks the same question up to three times a round (the run's target, its
    budget, the ε it reports), ~0.1 s each, which a one-step round of distributed DP would spend mostly here."""
    counter = ACCOUNTANTS[accountant]()
    counter.history = list(history)
    return float(counter.get_epsilon(delta))


def _checked(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant {accountant!r} is not one of {' | '.join(ACCOUNTANTS)}")
    return accountant
