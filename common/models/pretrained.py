"""Pretrained weights for the round-1 global model (run setting `pretrained`), offline first.

Only the server reads them: they reach every site as the round-1 global model, so hospitals need
neither internet nor the file. `pretrained` is either
- a path (contains a `/` or ends in `.pt` / `.pth`): a state_dict saved by `torch.save` (also a
  fedhosp model.pt or checkpoint, whose `state_dict` is used), or
- a torchvision weights name: `ResNet18_Weights.IMAGENET1K_V1`, or `IMAGENET1K_V1` / `DEFAULT` for
  the run's model. The file is looked up in torch.hub's cache (`$TORCH_HOME/hub/checkpoints/`) and
  downloaded there only when missing; offline, the error names the file to place there.

A file must fit the model: every key the model has, with its shape, except the head's (the last
block, common/models/trainable.py), which may be absent or of another size (another number of
classes: it keeps its fresh initialisation; a U-Net with a ResNet encoder: the decoder too). BatchNorm's
running statistics in torchvision's files have no place in the GroupNorm models and are left out; its
affine weights become GroupNorm's.
Anything else missing, extra or of another shape is one ConfigError naming the file. The file's
sha256 goes into the model card.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from common.errors import ConfigError
from common.models import spec
from common.models.trainable import blocks

log = logging.getLogger(__name__)
SUFFIXES = (".pt", ".pth")
PREFIXES = ("_module.", "module.")  # Opacus's and DataParallel's wrappers
BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")
SHOWN = 3  # keys named per kind of misfit


@dataclass(frozen=True)
class Weights:
    setting: str  # as the run gave it
    path: Path  # the file read
    sha256: str
    fresh: tuple[str, ...] = ()  # the model's keys left at their initialisation (the head's, when it differs)


def is_path(setting: str) -> bool:
    return "/" in setting or "\\" in setting or setting.lower().endswith(SUFFIXES)


def locate(setting: str, task: str, model: str, fetch: bool = True) -> Path:
    """The file `setting` names, on this machine: a path as given, a torchvision name in torch.hub's cache
    (downloaded there when missing, if `fetch`)."""
    if is_path(setting):
        path = Path(setting).expanduser()
        if not path.is_file():
            raise ConfigError(f"pretrained = {setting!r}: no such file: pass the path of a .pt/.pth state_dict")
        return path
    weights = torchvision_weights(setting, task, model)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file() and fetch:
        try:
            download(weights.url, path)
        except Exception as exc:  # offline (URLError), a proxy, a full disk: all mean "place the file by hand"
            raise ConfigError(
                f"pretrained = {setting!r}: torchvision's file {path.name} is not in torch.hub's cache and cannot "
                f"be downloaded ({type(exc).__name__}: {exc}): copy {weights.url} to {path} "
                "(or set TORCH_HOME), or pass pretrained = PATH") from None
    return path


def download(url: str, path: Path) -> None:
    """torch.hub's download into its own cache (the one network access here; tests replace it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=False)


def torchvision_weights(setting: str, task: str, model: str) -> torchvision.models.WeightsEnum:
    """`ResNet18_Weights.IMAGENET1K_V1`, or `IMAGENET1K_V1` / `DEFAULT` of the model's own enum."""
    arch = spec(task, model).torchvision
    if not arch:
        raise ConfigError(f"pretrained = {setting!r}: model '{model}' has no torchvision weights: "
                          "pass pretrained = PATH (a state_dict of this model)")
    enum = torchvision.models.get_model_weights(arch)
    names = [f"{enum.__name__}.{k}" for k in enum.__members__]
    full = setting if "." in setting else f"{enum.__name__}.{setting}"
    if full not in names:
        raise ConfigError(f"pretrained = {setting!r} is not a weights name of {arch} (model '{model}'): "
                          f"choose one of {', '.join(names)}, or pass pretrained = PATH")
    return torchvision.models.get_weight(full)


def read(path: Path, setting: str = "") -> tuple[OrderedDict[str, torch.Tensor], str]:
    """The tensors in a weights file, wrappers' prefixes removed, and the sha256 of the bytes they were
    read from (read once: the digest is of what was loaded); anything else is a ConfigError."""
    name = setting or str(path)
    try:
        raw = Path(path).read_bytes()
        data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"pretrained = {name!r}: {path} is not a torch weights file "
                          f"({type(exc).__name__}): pass a state_dict saved by torch.save") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # a fedhosp model.pt / checkpoint, or a training script's checkpoint
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConfigError(f"pretrained = {name!r}: {path} holds no state_dict (a dict of tensors): "
                          "save model.state_dict(), not the model")
    state = OrderedDict()
    for key, value in data.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        state[str(key)] = value
    return state, hashlib.sha256(raw).hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(model: nn.Module, setting: str, task: str, name: str) -> Weights:
    """Load `setting`'s weights into `model` (a fresh registry `name`), checked for fit; see the module docstring."""
    path = locate(setting, task, name)
    state, digest = read(path, setting)
    adapt = getattr(model, "pretrained_keys", None)
    if adapt is not None:
        state = OrderedDict(adapt(state))
    own = model.state_dict()
    # what may stay at its initialisation: the head; a U-Net's whole decoder (its file is an encoder's)
    head = tuple(getattr(model, "pretrained_fresh", ())) or (blocks(model)[-1][0] + ".",)
    state = OrderedDict((k, v) for k, v in state.items() if k in own or not k.endswith(BATCHNORM_STATS))
    unexpected = [k for k in state if k not in own]
    differ = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    fresh = tuple(k for k in missing + differ if k.startswith(head))
    misfit = [(what, [k for k in keys if k not in fresh]) for what, keys in
              (("of another shape", differ), ("missing", missing), ("not in the model", unexpected))]
    problems = [f"{len(keys)} {what} ({_shown(keys, state, own)})" for what, keys in misfit if keys]
    if problems:
        raise ConfigError(f"pretrained = {setting!r}: {path} does not fit model '{name}': {'; '.join(problems)}: "
                          f"pass weights saved from a {name}")
    model.load_state_dict(OrderedDict((k, v) for k, v in state.items() if k not in fresh), strict=False)
    weights = Weights(setting, path, digest, fresh)
    if fresh:
        log.info("pretrained %s: %s loaded; %s kept fresh (another size)", setting, path.name, ", ".join(fresh))
    _KNOWN[setting] = weights
    return weights


def _shown(keys: list[str], state: dict, own: dict) -> str:
    def one(k: str) -> str:
        if k in state and k in own:
            return f"{k}: file {list(state[k].shape)}, model {list(own[k].shape)}"
        return k
    return ", ".join(one(k) for k in keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


_KNOWN: dict[str, Weights] = {}  # this process's loads: the model card records what was loaded


def identity(setting: str, task: str, name: str) -> tuple[str, str]:
    """(setting, sha256) of the weights a run started from, for its model card; ("", "") for none."""
    if not setting:
        return "", ""
    if setting in _KNOWN:  # what this process loaded for the run's round 1 (each run's server loads it)
        return setting, _KNOWN[setting].sha256
    try:  # a resumed run, whose round 1 was another process: the same file, if it is still there
        return setting, sha256(locate(setting, task, name, fetch=False))
    except (ConfigError, OSError) as exc:
        log.warning("the model card cannot record the digest of pretrained = %s: %s", setting, exc)
        return setting, ""
