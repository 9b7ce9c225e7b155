"""Run and site settings, parsed once at the edge into frozen dataclasses.

Flower hands the apps `context.run_config` / `context.node_config` as flat dicts
with kebab-case keys; the CLI builds the same keys. Everything below the edge
receives a `RunConfig` or `SiteConfig`, never a dict or an argparse Namespace.
The defaults here equal `[tool.flwr.app.config]` in pyproject.toml (a test checks it).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common import class_weights
from common.errors import ConfigError
from common.transport import UPDATE_DTYPES

TASKS = ("classification", "segmentation")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
              "bulyan", "scaffold")
DEVICES = ("auto", "cpu", "cuda")
CLIENT_DP = ("off", "fixed", "adaptive")
SECURE_AGGREGATION = ("off", "secaggplus")  # common/secagg.py, docs/secure-aggregation.md
DP_MODES = ("local", "distributed")  # distributed: docs/secure-aggregation.md, "Distributed DP"
OPTIMIZERS = ("sgd", "adam", "adamw")
CHANNELS = (0, 1, 3)
TRAINABLE = re.compile(r"^(all|head|last-[1-9][0-9]*)$")  # common/models/trainable.py defines the blocks


# What a task brings to a run that leaves these settings unset ("" or 0 in pyproject.toml, which has no
# null): its model, and the local schedule measured to reach the docs' figures under DP (segmentation
# needs more local epochs and a larger step). Resolved in RunConfig itself, so `fedhosp simulate --task`,
# `fedhosp server` and `flwr run . --run-config "task='segmentation'"` all get the same run.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"model": "cnn", "learning_rate": 0.05, "local_epochs": 3},
    "segmentation": {"model": "unet", "learning_rate": 0.1, "local_epochs": 6},
}
# round-timeout left unset (0): this in deployment; simulation scales it to its waves of sites.
ROUND_TIMEOUT_S = 600.0


def _positive(v: float) -> bool:
    return v > 0


def _fraction(v: float) -> bool:
    return 0 < v <= 1


def _open_unit(v: float) -> bool:
    return 0 < v < 1


def _spec(default: Any, check: Callable[[Any], bool] | None = None, accepted: str = "") -> Any:
    return field(default=default, metadata={"check": check, "accepted": accepted})


@dataclass(frozen=True)
class RunConfig:
    """One federated run: the same object on the server, every site and the CLI."""

    num_server_rounds: int = _spec(8, lambda v: v >= 1, "an integer >= 1")
    task: str = _spec("classification", lambda v: v in TASKS, " | ".join(TASKS))
    model: str = _spec("")  # "": the task's (TASK_DEFAULTS); checked against the model registry by the caller
    # The round-1 global model's weights, read by the server only (common/models/pretrained.py): "" none;
    # a path to a .pt/.pth state_dict; or a torchvision weights name (ResNet18_Weights.IMAGENET1K_V1).
    pretrained: str = _spec("")
    # What trains, the rest frozen and so neither noised nor changed: all | head | last-N blocks.
    trainable: str = _spec("all", lambda v: bool(TRAINABLE.match(v)), "all | head | last-N (N >= 1)")
    optimizer: str = _spec("sgd", lambda v: v in OPTIMIZERS, " | ".join(OPTIMIZERS))
    # Input channels: 0 the model's own (3 for the pretrained backbones, 1 for cnn/unet); 1 grey (colour
    # images by their luma); 3 colour (grey images repeated). Images are decoded to these channels.
    channels: int = _spec(0, lambda v: v in CHANNELS, "0 (the model's) | 1 | 3")
    image_size: int = _spec(32, lambda v: 16 <= v <= 1024, "an integer in [16, 1024]")
    num_classes: int = _spec(2, lambda v: v >= 2, "an integer >= 2")
    strategy: str = _spec("fedavg", lambda v: v in STRATEGIES, " | ".join(STRATEGIES))
    proximal_mu: float = _spec(0.0, lambda v: v >= 0, "a number >= 0")  # FedProx's μ (Flower sends it per round)
    server_learning_rate: float = _spec(0.1, _positive, "a number > 0")  # FedAdam/FedYogi/FedAdagrad's η
    server_beta1: float = _spec(0.9, lambda v: 0 <= v < 1, "a number in [0, 1)")
    server_beta2: float = _spec(0.99, lambda v: 0 <= v < 1, "a number in [0, 1)")
    server_tau: float = _spec(1e-3, _positive, "a number > 0")  # adaptivity: larger is closer to FedAvgM
    trimmed_beta: float = _spec(0.2, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")  # cut from each end
    num_malicious_sites: int = _spec(0, lambda v: v >= 0, "an integer >= 0")  # Krum / Bulyan's f
    local_norm: bool = _spec(False)  # FedBN: normalization layers stay on each site
    fine_tune_epochs: int = _spec(0, lambda v: v >= 0, "an integer >= 0")  # personalized evaluation
    validate_updates: bool = _spec(True)
    update_norm_ratio: float = _spec(10.0, lambda v: v > 1, "a number > 1")  # reject norms above ratio x median
    # Reject an update whose L2 distance from the global model is above this (0: no absolute bound). Off by
    # default: a good bound depends on the model and learning rate; it is what guards a 1-site round.
    max_update_norm: float = _spec(0.0, lambda v: v >= 0, "a number >= 0 (0: off)")
    # The most one site's num-examples weighs in the weighted mean (a site claiming more counts this much);
    # 1 weighs every site equally. A fixed cap rather than the site's first claim: a site that lies from
    # round 1 is bounded too. Set it to the largest hospital's size when the consortium knows its sizes.
    # Metrics are weighted by the same capped counts (the train metrics' num-examples is their sum).
    max_site_weight: int = _spec(1_000_000, lambda v: v >= 1, "an integer >= 1 (1: uniform weights)")
    fraction_train: float = _spec(1.0, _fraction, "a number in (0, 1]")
    fraction_evaluate: float = _spec(1.0, _fraction, "a number in (0, 1]")
    min_available_sites: int = _spec(2, lambda v: v >= 1, "an integer >= 1")
    # 0: not set, the engine decides (ROUND_TIMEOUT_S; simulation scales it); read it as round_timeout_s.
    round_timeout: float = _spec(0.0, lambda v: v >= 0, "seconds > 0 (0: the engine's default)")
    # How long the server waits for min-available-sites sites before it gives up (server/waiting.py).
    site_wait: float = _spec(300.0, _positive, "seconds > 0")
    # Continue a stopped run from checkpoint-last.pt in out-dir at the next round (server/resume.py).
    resume: bool = _spec(False)
    # The run's name in the sites' privacy ledgers: set by the server to Flower's run id, and kept
    # across --resume, so ε per run keeps adding up over the rounds before and after the restart.
    run_name: str = _spec("")
    local_epochs: int = _spec(0, lambda v: v >= 0, "an integer >= 1 (0: the task's)")
    batch_size: int = _spec(64, lambda v: v >= 1, "an integer >= 1")
    # The training loss's class weights (common/class_weights.py): none | prior (balanced, from class-prior,
    # the known prevalence of class 1; two classes) | "w0,w1,..." one per class. Never from a site's counts.
    class_weights: str = _spec("none")
    class_prior: float = _spec(0.0, lambda v: 0 <= v < 1, "a number in (0, 1), the prevalence of class 1 (0: unset)")
    learning_rate: float = _spec(0.0, lambda v: v >= 0, "a number > 0 (0: the task's)")
    momentum: float = _spec(0.9, lambda v: 0 <= v < 1, "a number in [0, 1)")
    dp_enabled: bool = _spec(True)
    dp_target_epsilon: float = _spec(8.0, _positive, "a number > 0")
    dp_target_delta: float = _spec(1e-4, _open_unit, "a number in (0, 1)")
    dp_max_grad_norm: float = _spec(1.0, _positive, "a number > 0")
    # local: each site's DP-SGD is calibrated to its own data (dp-target-epsilon). distributed (needs SecAgg+):
    # each round is one DP-SGD step of every site, its noise split so that only the unmasked sum carries
    # dp-noise-multiplier x dp-max-grad-norm, as one central DP-SGD step on the pooled batch would.
    dp_mode: str = _spec("local", lambda v: v in DP_MODES, " | ".join(DP_MODES))
    dp_noise_multiplier: float = _spec(0.0, lambda v: v >= 0, "a number > 0 (the sum's noise multiplier; "
                                                           "distributed dp-mode only)")
    # Simulation only: the total ε budget of every virtual site (0: none). A real site sets
    # its own budget in its node config (`privacy-budget`); the server cannot raise it.
    site_privacy_budget: float = _spec(0.0, lambda v: v >= 0, "a number >= 0 (0: no budget)")
    # Client-level DP: the server clips each site's update and noises the average (Flower's wrappers).
    client_dp: str = _spec("off", lambda v: v in CLIENT_DP, " | ".join(CLIENT_DP))
    client_dp_noise_multiplier: float = _spec(1.0, _positive, "a number > 0")
    client_dp_clipping_norm: float = _spec(1.0, _positive, "a number > 0 (the initial norm when adaptive)")
    # Secure aggregation (SecAgg+, docs/secure-aggregation.md): the server sees only the sum of the updates.
    secure_aggregation: str = _spec("off", lambda v: v in SECURE_AGGREGATION, " | ".join(SECURE_AGGREGATION))
    secagg_threshold: int = _spec(2, lambda v: v >= 2, "an integer >= 2 (shares needed to reconstruct a secret)")
    secagg_clipping_range: float = _spec(8.0, _positive, "a number > 0 (each update coordinate clipped to ±it)")
    secagg_quantization_range: int = _spec(4194304, lambda v: 2 <= v < 2**31, "an integer in [2, 2**31)")
    val_fraction: float = _spec(0.2, _open_unit, "a number in (0, 1)")
    seed: int = _spec(0)
    data_root: str = _spec("runs/demo/hospitals")
    state_root: str = _spec("runs/demo/sites")
    out_dir: str = _spec("runs/demo")
    client_threads: int = _spec(1, lambda v: v >= 0, "an integer >= 0 (0: torch's default)")
    # float16: sites send their update in half precision, half the bytes (common/transport.py).
    update_dtype: str = _spec("float32", lambda v: v in UPDATE_DTYPES, " | ".join(UPDATE_DTYPES))

    def __post_init__(self) -> None:
        """Settings left unset take the task's values: every RunConfig holds the values a run uses."""
        for name, value in TASK_DEFAULTS.get(self.task, {}).items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)
        self.loss_weights  # noqa: B018  (a bad class-weights setting stops here, at the edge)
        if self.strategy == "scaffold" and self.optimizer != "sgd":
            raise ConfigError(f"strategy 'scaffold' with optimizer '{self.optimizer}': SCAFFOLD's control "
                              "variates count plain SGD steps (c_i + (x - y) / (K * lr)): use optimizer = sgd")
        if self.dp_mode == "distributed":
            self._check_distributed()

    def _check_distributed(self) -> None:
        """Distributed DP is one SGD step of DP-SGD per round whose noise only the SecAgg+ sum carries whole:
        every setting that breaks one of those words is refused here, on the server and at every site."""
        needs = {
            "secure-aggregation": (self.secure_aggregation != "off", "secaggplus: the server must see only the "
                                   "sum, which alone carries the whole noise"),
            "dp-enabled": (self.dp_enabled, "true: each site clips per sample and adds its share of the noise"),
            "optimizer": (self.optimizer == "sgd", "sgd: one Adam step from a fresh state is lr·sign(g), not "
                          "linear, so the sites' sum would not be one DP-SGD step"),
            "client-dp": (self.client_dp == "off", "off: the sites add the noise; the server adds none"),
            "dp-noise-multiplier": (self.dp_noise_multiplier > 0, "a number > 0, the noise multiplier of the sum "
                                    "(e.g. from a target ε: common/privacy.py noise_multiplier)"),
        }
        for key, (ok, needed) in needs.items():
            if not ok:
                raise ConfigError(f"dp-mode = distributed needs {key} = {needed}")

    @property
    def loss_weights(self) -> tuple[float, ...] | None:
        """The training loss's class weights (common/class_weights.py); None: plain cross-entropy."""
        return class_weights.parse(self.class_weights, self.class_prior, self.num_classes) \
            if self.task == "classification" else None

    @property
    def round_timeout_s(self) -> float:
        return self.round_timeout or ROUND_TIMEOUT_S

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run_config (kebab-case keys); unknown keys are errors."""
        return _parse(cls, values)

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case dict Flower and `--run-config` speak."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def site_data_path(self, partition_id: int) -> Path:
        """Simulation only: Flower gives virtual sites no paths, so derive them."""
        return Path(self.data_root) / site_name(partition_id)

    def site_state_dir(self, partition_id: int) -> Path:
        return Path(self.state_root) / site_name(partition_id)


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's own settings: where its data and state live, which device it trains on."""

    data_path: str = _spec("")
    state_dir: str = _spec("")
    device: str = _spec("auto", lambda v: v in DEVICES, " | ".join(DEVICES))
    # Total ε this hospital allows over every run on its data; kept in its ledger. 0: not named, so a real
    # site uses site_policy.DEFAULT_PRIVACY_BUDGET and a virtual one the run's site-privacy-budget.
    privacy_budget: float = _spec(0.0, lambda v: v >= 0, "a number >= 0 (0: the default)")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SiteConfig:
        site = _parse(cls, values)
        if not site.data_path:
            raise ConfigError("site setting 'data-path' is missing: pass the hospital's data folder")
        if not site.state_dir:
            raise ConfigError("site setting 'state-dir' is missing: pass a folder for the site's state")
        return site


def parse_overrides(text: str) -> dict[str, Any]:
    """`--run-config` for every command: `"a=1 b='two words' c=x"` -> {"a": 1, "b": "two words", "c": "x"}.
    Each value is read as a TOML value (Flower's syntax: numbers, true/false, quoted strings), or else
    as a bare word, so `task=segmentation` and `task='segmentation'` mean the same everywhere."""
    return {key: _toml_or_word(value) for key, value in key_value_pairs(text, "--run-config", "KEY=VALUE")}


def key_value_pairs(text: str, flag: str, form: str) -> list[tuple[str, str]]:
    """`text`'s shell words as (key, value) pairs, each `KEY=...`: the one tokenizer of every
    KEY=VALUE option (`flag` and `form` name it in the error)."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: {exc}") from None
    pairs = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} entry {token!r} is not {form}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def to_toml(value: Any) -> str:
    """One value as Flower's `--run-config` reads it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _toml_or_word(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def site_name(partition_id: int) -> str:
    return f"site-{partition_id:03d}"


def _parse(cls: type, values: Mapping[str, Any]) -> Any:
    specs = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in specs:
            known = [n.replace("_", "-") for n in specs]
            hint = difflib.get_close_matches(key, known, n=1)
            tip = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown setting '{key}'{tip}")
        kwargs[name] = _coerce(key, raw, specs[name])
    return cls(**kwargs)


def _coerce(key: str, raw: Any, spec: Any) -> Any:
    kind = type(spec.default)
    accepted = spec.metadata.get("accepted") or kind.__name__
    try:
        value = _convert(raw, kind)
    except (TypeError, ValueError):
        raise ConfigError(f"setting '{key}' = {raw!r} is not valid: expected {accepted}") from None
    check = spec.metadata.get("check")
    if check is not None and not check(value):
        raise ConfigError(f"setting '{key}' = {raw!r} is out of range: expected {accepted}")
    return value


def _convert(raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        return int(raw)
    if kind is float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    return str(raw)
