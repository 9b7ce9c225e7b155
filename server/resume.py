"""Resume a stopped run at the next round, from exactly the weights and strategy state it stopped with.

The global weights, round and config come from `checkpoint-last.pt` (server/checkpoint.py).
What the strategy carries between rounds (FedAdam/FedYogi/FedAdagrad moments, SCAFFOLD's
control variate, adaptive clipping's norm) goes to `strategy-last.pt` beside it, stamped
with its round: written before the checkpoint, so a crash between the two is caught as a
round mismatch instead of silently mixing rounds. Randomness after the resume point (site
sampling with fraction-train < 1, client-level DP noise) is drawn afresh.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from common.config import RunConfig
from common.errors import ConfigError
from server import checkpoint, runlog

log = logging.getLogger(__name__)
STRATEGY_LAST = "strategy-last.pt"
# Attributes that carry state from one round to the next, on a strategy or a wrapper around one.
STATEFUL = ("m_t", "v_t", "current_arrays", "control", "clipping_norm")
# Settings that must match for the checkpoint's weights to mean the same thing in this run.
SAME = ("task", "model", "image-size", "num-classes", "strategy", "client-dp")


@dataclass(frozen=True)
class Resumed:
    arrays: ArrayRecord
    next_round: int
    run_name: str  # the stopped run's name in the sites' ledgers


def save_strategy(out: Path, strategy: Strategy, server_round: int) -> None:
    path = out / STRATEGY_LAST
    tmp = path.with_suffix(".tmp")
    torch.save({"round": server_round, "layers": [_capture(layer) for layer in _layers(strategy)]}, tmp)
    os.replace(tmp, path)


def restore(out: Path, cfg: RunConfig, strategy: Strategy) -> Resumed:
    """Load the last checkpoint into `strategy`; trim the run log to it; return where to go on."""
    path = out / checkpoint.LAST
    if not path.is_file():
        raise ConfigError(f"resume: no {path}; start without resume, or point out-dir at the stopped run's folder")
    saved = checkpoint.load(path)
    done = int(saved["round"])
    old = saved["config"]
    changed = [k for k in SAME if k in old and old[k] != cfg.to_mapping()[k]]
    if changed:
        raise ConfigError(f"resume: {', '.join(f'{k} was {old[k]!r}' for k in changed)} in {path}; "
                          "resume with the stopped run's settings")
    if done >= cfg.num_server_rounds:
        raise ConfigError(f"resume: {path} is at round {done} of {cfg.num_server_rounds}: the run is finished; "
                          "raise num-server-rounds to train further")
    _load_strategy(out, strategy, done)
    log_path = out / runlog.RUN_LOG
    records = [r for r in runlog.read(log_path) if int(r["round"]) <= done] if log_path.is_file() else []
    runlog.start(log_path)
    for record in records:
        runlog.append(log_path, record)
    log.info("resuming after round %d of %d from %s", done, cfg.num_server_rounds, path)
    return Resumed(ArrayRecord(torch_state_dict=saved["state_dict"]), done + 1, str(old.get("run-name", "")))


def _load_strategy(out: Path, strategy: Strategy, done: int) -> None:
    path = out / STRATEGY_LAST
    layers = _layers(strategy)
    if not path.is_file():
        if any(_capture(layer) for layer in layers):
            raise ConfigError(f"resume: {path} is missing: the strategy's state cannot be restored")
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if int(saved["round"]) != done:
        raise ConfigError(f"resume: {path} is from round {saved['round']} but the checkpoint from round {done}; "
                          "the server stopped while saving: resume from a backup or start again")
    for layer, state in zip(layers, saved["layers"], strict=True):
        for name, value in state.items():
            setattr(layer, name, _from_saved(value))


def _layers(strategy: Strategy) -> list[Strategy]:
    """The strategy and every strategy it wraps (Flower's DP wrappers keep theirs in `.strategy`)."""
    layers = [strategy]
    while isinstance(getattr(layers[-1], "strategy", None), Strategy):
        layers.append(layers[-1].strategy)
    return layers


def _capture(layer: Strategy) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name in STATEFUL:
        value = getattr(layer, name, None)
        if isinstance(value, dict):
            state[name] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in value.items()}
        elif isinstance(value, int | float) and not isinstance(value, bool):
            state[name] = float(value)
    return state


def _from_saved(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return value
