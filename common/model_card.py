"""The model card a model file carries, and reading a model file at a hospital.

A hospital applying the global model must decode its images exactly as the sites
did in training and must know what the model is worth (held-out metrics) and what
it cost in privacy (ε). The card records both inside the file, so neither can be
separated from the weights. The server writes it (server/checkpoint.py); `fedhosp
predict` reads it here, in common/, because a hospital has no server code to ask.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.config import TASKS, RunConfig
from common.errors import ConfigError, ModelFileError
from common.models import build_model, input_channels, pretrained

FILE_FORMAT = 1  # layout of checkpoint and model files: format, round, config, metrics, state_dict (+ card)
CARD_FORMAT = 1  # layout of the card below; bump when a field changes meaning
# The decoder a site keys its decode cache with (client/site.py `Site.data()`): the model
# only sees images decoded by this version, so a file from another version is refused.
DECODER = "v2"
WINDOWING = "the file's VOI window (WindowCenter/WindowWidth), else its 1st-99th percentile"
PREPROCESSING = (
    "modality LUT (RescaleSlope/Intercept), VOI window, MONOCHROME1 inverted, scaled to [0, 1], "
    "bilinear antialiased resize to a square, stored as float16 (the site's decode cache)"
)


@dataclass(frozen=True)
class ModelCard:
    """What a model is for, how its inputs are prepared, and what training it took."""

    task: str
    architecture: str
    num_classes: int
    image_size: int
    rounds: int
    sites: int  # sites whose update made the final round's model
    metrics: dict[str, float] = field(default_factory=dict)  # final round's held-out metrics, over sites
    epsilon: float | None = None  # ε spent, max over sites; None: trained without DP
    delta: float | None = None
    strategy: str = "fedavg"
    # two classes: class 1 where its probability is >= this, chosen on the sites' pooled validation
    # (common/decision.py); None: argmax (more classes, or no pooled split with both classes)
    threshold: float | None = None
    in_channels: int = 1  # the images are decoded to these (1 grey, 3 colour: fedhosp predict does the same)
    pretrained: str = ""  # the round-1 weights (run setting `pretrained`): a path or a torchvision name
    pretrained_sha256: str = ""  # of that file, as the server read it
    trainable: str = "all"  # what the sites trained; the rest kept the pretrained weights
    decoder: str = DECODER
    windowing: str = WINDOWING
    preprocessing: str = PREPROCESSING
    format: int = CARD_FORMAT

    @classmethod
    def for_run(cls, cfg: RunConfig, rounds: int, sites: int, metrics: Mapping[str, Any],
                epsilon: float | None) -> ModelCard:
        return cls(
            task=cfg.task, architecture=cfg.model, num_classes=cfg.num_classes, image_size=cfg.image_size,
            rounds=rounds, sites=sites, metrics={k: float(v) for k, v in metrics.items()},
            epsilon=None if epsilon is None else float(epsilon),
            delta=cfg.dp_target_delta if cfg.dp_enabled else None, strategy=cfg.strategy,
            threshold=float(metrics["threshold"]) if cfg.num_classes == 2 and "threshold" in metrics else None,
            in_channels=input_channels(cfg.task, cfg.model, cfg.channels),
            **dict(zip(("pretrained", "pretrained_sha256"),
                       pretrained.identity(cfg.pretrained, cfg.task, cfg.model), strict=True)),
            trainable=cfg.trainable,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values only, so `torch.load(weights_only=True)` reads it back."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "model file") -> ModelCard:
        """Parse and check a card; anything unexpected is a ModelFileError naming `source`."""
        found = values.get("format")
        if found != CARD_FORMAT:
            raise ModelFileError(f"{source}: model card format {found!r}, this fedhosp reads {CARD_FORMAT}: "
                                 "use the fedhosp version that wrote it, or retrain")
        kwargs = {str(k).replace("-", "_"): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}
        unknown, missing = set(kwargs) - known, {"task", "architecture", "num_classes", "image_size"} - set(kwargs)
        if unknown or missing:
            raise ModelFileError(f"{source}: model card has unknown fields {sorted(unknown)} or lacks "
                                 f"{sorted(missing)}: the file is damaged or from another fedhosp")
        card = cls(**kwargs)
        card._check(source)
        return card

    def _check(self, source: str) -> None:
        if self.task not in TASKS:
            raise ModelFileError(f"{source}: task {self.task!r} is not one fedhosp runs ({' | '.join(TASKS)})")
        numbers = (self.num_classes, self.image_size, self.rounds, self.sites, self.in_channels)
        if not all(isinstance(v, int) and v >= 0 for v in numbers):
            raise ModelFileError(f"{source}: model card sizes/counts are not non-negative integers: damaged file")
        if self.threshold is not None and not (isinstance(self.threshold, float) and 0 < self.threshold < 1):
            raise ModelFileError(f"{source}: model card threshold {self.threshold!r} is not a number in (0, 1): "
                                 "damaged file")

    def lines(self) -> list[str]:
        """The card as a person reads it (`fedhosp predict` prints this)."""
        shown = " | ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if k not in ("num-examples", "sites"))
        held_out = int(self.metrics.get("num-examples", 0))
        if self.epsilon is not None:
            privacy = f"DP-SGD, ε = {self.epsilon:.3g} spent (max over sites), δ = {self.delta:g}"
        else:
            privacy = "DP-SGD, ε not reported" if self.delta is not None else "trained without differential privacy"
        return [
            f"task           {self.task}, {self.num_classes} classes",
            f"architecture   {self.architecture}, {self.in_channels} input channel(s)",
            *([f"pretrained     {self.pretrained} (sha256 {self.pretrained_sha256 or 'not recorded'}), "
               f"trainable {self.trainable}"] if self.pretrained else []),
            f"input          {self.image_size}x{self.image_size}, decoder {self.decoder}",
            f"windowing      {self.windowing}",
            f"preprocessing  {self.preprocessing}",
            f"training       {self.rounds} rounds of {self.strategy}, {self.sites} sites in the final round",
            f"final metrics  {shown or 'none reported'} (held out at the sites, {held_out} images)",
            f"privacy        {privacy}",
            f"decision       {self._decision()}",
        ]


    def _decision(self) -> str:
        if self.task != "classification":
            return "each pixel's most probable class"
        if self.threshold is None:
            return "the most probable class"
        return (f"class 1 where its probability is >= {self.threshold:g} (the best balanced accuracy on the "
                "sites' pooled validation splits)")


@dataclass(frozen=True)
class ModelFile:
    card: ModelCard
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]


def read_model_file(path: Path) -> ModelFile:
    """A model file's card, weights and config; a wrong version or a missing card is a ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist: pass the model.pt a run wrote")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelFileError(f"{path} is not a fedhosp model file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise ModelFileError(f"{path} is not a fedhosp model file (no weights inside)")
    if data.get("format") != FILE_FORMAT:
        raise ModelFileError(f"{path}: model file format {data.get('format')!r}, this fedhosp reads "
                             f"{FILE_FORMAT}: use the fedhosp version that wrote it, or retrain")
    if not isinstance(data.get("card"), dict):
        raise ModelFileError(f"{path} has no model card: pass the final model.pt of a run "
                             "(checkpoint-last.pt is for resuming training)")
    card = ModelCard.from_dict(data["card"], str(path))
    config = dict(data.get("config") or {})
    if config.get("task", card.task) != card.task:
        raise ModelFileError(f"{path}: the card says task {card.task!r} but the run config says "
                             f"{config['task']!r}: the file is damaged")
    return ModelFile(card, dict(data["state_dict"]), config)


def load_model(path: Path) -> tuple[ModelCard, nn.Module]:
    """The card and the model, rebuilt from the registry and loaded with the file's weights."""
    model_file = read_model_file(path)
    card = model_file.card
    if card.decoder != DECODER:
        raise ModelFileError(f"{path}: the model was trained on images decoded by decoder {card.decoder}, "
                             f"this fedhosp decodes with {DECODER}: use the version that trained it, or retrain")
    try:
        model = build_model(card.task, card.architecture, card.in_channels, card.num_classes, card.image_size)
    except ConfigError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(model_file.state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelFileError(f"{path}: the weights do not fit a {card.architecture} for {card.task} "
                             f"({first}): the file is damaged") from None
    return card, model.eval()

