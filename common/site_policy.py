"""What protects a hospital's patients, decided by the hospital: its node config, never the run's settings.

The coordinator's RunConfig arrives in every message, so anything it holds is the coordinator's
choice. A site's `SitePolicy` is parsed once from its own node config and bounds that choice: a run
asking for less protection than the site allows (no DP, a larger δ, less noise, a larger ε, another
validation split) or for more memory or disk than the site's caps is refused before any work,
its ledger untouched. In simulation one researcher plays every site, so `SitePolicy.accepting`
admits exactly the run's own settings: simulations keep working and still go through every check.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.config import RunConfig, _parse, _spec
from common.errors import FedhospError
from common.protocol import REFUSABLE

# A real site's total ε over every run on its data when the hospital names none (`fedhosp client
# --privacy-budget`, node config `privacy-budget`): one run at the coordinator's default target (8) and a
# little more, at the upper end of what DP-SGD studies call meaningful. Spent, the site refuses every
# further DP round until the hospital raises it on purpose.
DEFAULT_PRIVACY_BUDGET = 10.0
ACCOUNTANTS = ("rdp", "prv")  # common/privacy.py ACCOUNTANTS' names (not imported: that pulls in Opacus)
DELTA_PER_IMAGE = 10  # the automatic δ: 1/(10·N) for N training images, well below the 1/N a release of one image costs


class SitePolicyRefused(FedhospError):
    """A run asks for a setting this site does not accept: it is refused, not trained or evaluated."""

    def __init__(self, setting: str, message: str) -> None:
        if setting not in REFUSABLE:  # the refusal names its setting on the wire: only ones the protocol lists
            raise ValueError(f"{setting!r} is not in common.protocol.REFUSABLE")
        super().__init__(f"run setting '{setting}': {message}")
        self.setting = setting


def _at_least(low: float) -> Any:
    return lambda v: v >= low


@dataclass(frozen=True)
class SitePolicy:
    """The hospital's privacy floor and resource caps (node-config keys: the field names in kebab-case)."""

    allow_no_dp: bool = _spec(False)  # training without DP only if the hospital says so
    dp_delta: float = _spec(0.0, lambda v: 0 <= v < 1, "a number in [0, 1) (0: 1/(10·N))")
    min_noise_multiplier: float = _spec(0.5, _at_least(0), "a number >= 0")
    max_epsilon_per_run: float = _spec(8.0, lambda v: v > 0, "a number > 0")
    val_fraction: float = _spec(0.2, lambda v: 0 < v < 1, "a number in (0, 1)")
    split_seed: int = _spec(0)  # the site's split: a coordinator's seed cannot move images across it
    max_image_size: int = _spec(256, _at_least(16), "an integer >= 16")
    max_num_classes: int = _spec(100, _at_least(2), "an integer >= 2")
    max_batch_size: int = _spec(256, _at_least(1), "an integer >= 1")
    max_local_epochs: int = _spec(50, _at_least(1), "an integer >= 1")
    max_fine_tune_epochs: int = _spec(50, _at_least(0), "an integer >= 0")
    max_server_rounds: int = _spec(1000, _at_least(1), "an integer >= 1")  # a ledger entry per round
    max_client_threads: int = _spec(64, _at_least(1), "an integer >= 1")
    decode_caches: int = _spec(3, _at_least(1), "an integer >= 1")  # decoded image sets kept on disk
    # evaluation is an oracle on the validation images: a run gets this many answers per round the site
    # trained in it, plus one (the starting model's), whatever the coordinator sends
    evaluations_per_round: int = _spec(1, _at_least(1), "an integer >= 1")
    min_validation_images: int = _spec(20, _at_least(0), "an integer >= 0")  # fewer: metrics about a few patients
    # the ledger's HMAC key, outside the state folder ("": `<state-dir>.ledger-key` beside it)
    ledger_key: str = _spec("")
    new_ledger: bool = _spec(False)  # the hospital starts a new ledger where its key shows one was deleted
    metric_decimals: int = _spec(3, lambda v: 0 <= v <= 15, "an integer in [0, 15]")  # evaluate metrics, rounded
    # how the ledger states ε and the noise for a run's target is found: Opacus's RDP, or its tighter PRV
    accountant: str = _spec("rdp", lambda v: v in ACCOUNTANTS, " | ".join(ACCOUNTANTS))
    # the site trains only in runs with secure aggregation (SecAgg+): the coordinator never sees its update
    require_secure_aggregation: bool = _spec(False)
    # distributed DP (dp-mode = distributed): the fewest sites whose noise must add up in the released sum,
    # which is SecAgg+'s threshold t (each site adds 1/sqrt(t) of it): fewer, and this site does not train
    distributed_dp_min_sites: int = _spec(3, _at_least(2), "an integer >= 2")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SitePolicy:
        return _parse(cls, values)

    @classmethod
    def accepting(cls, run: RunConfig) -> SitePolicy:
        """Simulation: a policy that admits exactly this run's settings, and nothing above them."""
        base = cls()
        return cls(
            allow_no_dp=True, dp_delta=run.dp_target_delta, min_noise_multiplier=0.0,
            max_epsilon_per_run=run.dp_target_epsilon, val_fraction=run.val_fraction, split_seed=run.seed,
            max_image_size=max(base.max_image_size, run.image_size),
            max_num_classes=max(base.max_num_classes, run.num_classes),
            max_batch_size=max(base.max_batch_size, run.batch_size),
            max_local_epochs=max(base.max_local_epochs, run.local_epochs),
            max_fine_tune_epochs=max(base.max_fine_tune_epochs, run.fine_tune_epochs),
            max_server_rounds=max(base.max_server_rounds, run.num_server_rounds),
            max_client_threads=max(base.max_client_threads, run.client_threads),
            evaluations_per_round=run.num_server_rounds + 1, min_validation_images=0,
            distributed_dp_min_sites=min(base.distributed_dp_min_sites, run.secagg_threshold),
        )

    def check_resources(self, run: RunConfig) -> None:
        """Before any allocation: every setting that sizes memory or disk within the site's caps."""
        caps = (("image-size", run.image_size, self.max_image_size),
                ("num-classes", run.num_classes, self.max_num_classes),
                ("batch-size", run.batch_size, self.max_batch_size),
                ("local-epochs", run.local_epochs, self.max_local_epochs),
                ("fine-tune-epochs", run.fine_tune_epochs, self.max_fine_tune_epochs),
                ("num-server-rounds", run.num_server_rounds, self.max_server_rounds),
                ("client-threads", run.client_threads, self.max_client_threads))
        for key, asked, cap in caps:
            if asked > cap:
                raise SitePolicyRefused(key, f"{asked} is above this site's cap max-{_cap_name(key)} = {cap}")

    def check_evaluation_settings(self, run: RunConfig) -> None:
        """Before an evaluation: the caps, and no fine-tuning unless this site accepts training without DP
        (fine-tune-epochs trains a personal model on the training split without noise; its scores leave)."""
        self.check_resources(run)
        if run.fine_tune_epochs and not self.allow_no_dp:
            raise SitePolicyRefused("fine-tune-epochs", f"{run.fine_tune_epochs} epochs of fine-tuning without DP; "
                                                        "this site trains with DP only (node config allow-no-dp = "
                                                        "false)")

    def check_training(self, run: RunConfig) -> None:
        """Before any data is read: the settings the run's own config decides."""
        self.check_resources(run)
        if not run.dp_enabled and not self.allow_no_dp:
            raise SitePolicyRefused("dp-enabled", "this site trains with DP only (node config allow-no-dp = false)")
        if not math.isclose(run.val_fraction, self.val_fraction):
            raise SitePolicyRefused("val-fraction", f"{run.val_fraction:g} is not this site's "
                                                    f"val-fraction = {self.val_fraction:g}")
        if self.require_secure_aggregation and run.secure_aggregation == "off":
            raise SitePolicyRefused("secure-aggregation", "this site trains only with secure aggregation "
                                                          "(node config require-secure-aggregation = true)")
        if run.dp_enabled and run.dp_target_epsilon > self.max_epsilon_per_run:
            raise SitePolicyRefused("dp-target-epsilon", f"{run.dp_target_epsilon:g} is above this site's "
                                                         f"max-epsilon-per-run = {self.max_epsilon_per_run:g}")

    def check_distributed(self, threshold: int, sampled: int) -> None:
        """Distributed DP, before any data is read: this site's share of the noise is 1/sqrt(threshold) of the
        sum's, so the threshold (and the sites sampled, which bound it) must reach this site's minimum.
        `threshold` and `sampled` are what this site itself checked at the round's SecAgg+ setup."""
        fewest = min(threshold, sampled)
        if fewest < self.distributed_dp_min_sites:
            raise SitePolicyRefused("secagg-threshold", f"distributed DP over {fewest} site(s) (secagg-threshold "
                                                        f"{threshold}, {sampled} sampled): this site's "
                                                        f"distributed-dp-min-sites = "
                                                        f"{self.distributed_dp_min_sites}")

    def delta_ceiling(self, num_examples: int) -> float:
        """The largest δ a run may use here: the site's own, else 1/(10·N) over its training images."""
        return self.dp_delta or 1.0 / (DELTA_PER_IMAGE * max(num_examples, 1))

    def check_delta(self, delta: float, num_examples: int) -> None:
        ceiling = self.delta_ceiling(num_examples)
        if delta > ceiling:
            raise SitePolicyRefused("dp-target-delta", f"{delta:g} is above this site's δ = {ceiling:g}")

    def check_noise(self, noise_multiplier: float) -> None:
        if noise_multiplier < self.min_noise_multiplier:
            raise SitePolicyRefused("dp-target-epsilon", f"the run's noise multiplier {noise_multiplier:.3f} is "
                                                         f"below this site's min-noise-multiplier = "
                                                         f"{self.min_noise_multiplier:g}")

    def evaluation_allowance(self, trained_rounds: int) -> int:
        """Evaluate answers a run gets here: `evaluations-per-round` for each round the site trained
        in it and for the starting model; the coordinator's round numbers count for nothing."""
        return self.evaluations_per_round * (trained_rounds + 1)

    def check_evaluation(self, answered: int, trained_rounds: int) -> None:
        """Before anything is read: refuse an evaluation beyond the run's allowance (`answered` so far)."""
        allowance = self.evaluation_allowance(trained_rounds)
        if answered >= allowance:  # no dedicated protocol name: the run's rounds are what the allowance counts
            raise SitePolicyRefused("evaluations-per-round", f"{answered} evaluations answered in this run, its "
                                                         f"allowance after {trained_rounds} trained round(s) "
                                                         f"(evaluations-per-round = {self.evaluations_per_round})")

    def check_validation(self, images: int) -> None:
        """Refuse to evaluate on a split so small its metrics describe individual patients."""
        if images < self.min_validation_images:
            raise SitePolicyRefused("min-validation-images", f"the validation split holds {images} images, fewer than "
                                                    f"this site's min-validation-images = "
                                                    f"{self.min_validation_images}")

    def rounded(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Evaluate metrics as they leave the site: floats to `metric-decimals`, so that answers to
        nearly equal models cannot be differenced down to one image; counts unchanged."""
        return {k: round(float(v), self.metric_decimals) if _fractional(v) else v for k, v in metrics.items()}

    def total_delta(self, num_examples: int, used: float) -> float:
        """δ at which the site states its total ε: its own δ; unset, the smaller of 1/(10·N) and the
        smallest δ a round of this site ever used (`used`), the conservative choice."""
        return self.dp_delta or min(self.delta_ceiling(num_examples), used or math.inf)


POLICY_KEYS = frozenset(f.name.replace("_", "-") for f in fields(SitePolicy))


def split_node_config(node_config: Mapping[str, Any]) -> tuple[SitePolicy, dict[str, Any]]:
    """The site's policy (its keys) and the rest of its node config (for SiteConfig)."""
    policy = {k: v for k, v in node_config.items() if k in POLICY_KEYS}
    rest = {k: v for k, v in node_config.items() if k not in POLICY_KEYS}
    return SitePolicy.from_mapping(policy), rest


def _fractional(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)


def _cap_name(key: str) -> str:
    return {"num-server-rounds": "server-rounds"}.get(key, key)
