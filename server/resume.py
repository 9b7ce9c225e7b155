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
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from common.config import RunConfig
from common.errors import ConfigError
from common.flower_compat import strategy_state
from server import checkpoint, durable, runlog

log = logging.getLogger(__name__)
STRATEGY_LAST = "strategy-last.pt"
# Settings that must match for the checkpoint's weights to mean the same thing in this run.
SAME = ("task", "model", "image-size", "num-classes", "strategy", "client-dp")


@dataclass(frozen=True)
class Resumed:
    arrays: ArrayRecord
    next_round: int
    run_name: str  # the stopped run's name in the sites' ledgers


def save_strategy(out: Path, strategy: Strategy, server_round: int) -> None:
    state = {"round": server_round, "layers": strategy_state.capture(strategy)}
    durable.replace(out / STRATEGY_LAST, lambda f: torch.save(state, f))


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
    runlog.rewrite(log_path, records)  # whole or not at all: a crash here keeps the finished rounds' lines
    log.info("resuming after round %d of %d from %s", done, cfg.num_server_rounds, path)
    return Resumed(ArrayRecord(torch_state_dict=saved["state_dict"]), done + 1, str(old.get("run-name", "")))


def _load_strategy(out: Path, strategy: Strategy, done: int) -> None:
    path = out / STRATEGY_LAST
    if not path.is_file():
        if any(strategy_state.capture(strategy)):
            raise ConfigError(f"resume: {path} is missing: the strategy's state cannot be restored")
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if int(saved["round"]) != done:
        raise ConfigError(f"resume: {path} is from round {saved['round']} but the checkpoint from round {done}; "
                          "the server stopped while saving: resume from a backup or start again")
    strategy_state.restore(strategy, saved["layers"])
