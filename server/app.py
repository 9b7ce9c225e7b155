"""The Flower ServerApp: parse the run's config once, run the rounds, checkpoint each one.

The round loop is ours rather than `Strategy.start`, for three reasons: a run log
line and a checkpoint after every round (so a crash loses no finished round), one
progress line per round, and a clear stop when every site fails. The strategy
still does all sampling and aggregation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from common import privacy, transport
from common.config import RunConfig
from common.errors import FedhospError
from common.flower_compat import waits
from common.grid_layer import layers
from common.logs import ensure_console
from common.models import build_model
from common.protocol import STATUS
from common.weights import plain_state_dict
from server import checkpoint, resume, runlog, validation
from server.assembly import compose
from server.strategies import build_strategy
from server.waiting import WaitingGrid

log = logging.getLogger(__name__)
SHOWN = (("accuracy", "acc"), ("auc", "auc"), ("dice", "dice"), ("iou", "iou"))


class BudgetsSpent(FedhospError):
    """Every sampled site declined the round: the federation has no privacy budget left to train with."""

    def __init__(self, message: str, refused: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass
class RoundResult:
    server_round: int
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    sites_ok: int = 0
    sites_failed: int = 0
    sites: list[dict[str, Any]] = field(default_factory=list)  # per site: node, ε, ε over all runs
    refused: list[dict[str, Any]] = field(default_factory=list)  # sites that declined: budget spent
    rejected: list[dict[str, Any]] = field(default_factory=list)  # updates that failed validation
    site_scores: list[dict[str, Any]] = field(default_factory=list)  # per site: held-out metrics
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.server_round,
            "train": self.train,
            "evaluate": self.evaluate,
            "sites_ok": self.sites_ok,
            "sites_failed": self.sites_failed,
            "sites_refused": len(self.refused),
            "sites": self.sites,
            "refused": self.refused,
            "sites_rejected": len(self.rejected),
            "rejected": self.rejected,
            "site_scores": self.site_scores,
            "seconds": round(self.seconds, 3),
        }


def make_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose settings are Flower's run_config with `overrides` on top.

    `flwr run .` uses `app` (no overrides); `fedhosp simulate` passes its settings
    here because Flower's Python simulation entry point hands apps an empty run_config.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        ensure_console()
        waits.shorten_object_pulls()  # this process's pulls of replies still arriving (flwr-serverapp's own)
        cfg = RunConfig.from_mapping({**context.run_config, **(overrides or {})})
        run(compose(grid, cfg), cfg, str(context.run_id))

    return server_app


app = make_app()


def run(grid: WaitingGrid, cfg: RunConfig, run_id: str) -> Path:
    """Train `cfg.num_server_rounds` rounds through `grid` (server/assembly.py's); return the final model's path."""
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.task, cfg.model, 1, cfg.num_classes, cfg.image_size)
    arrays = ArrayRecord(torch_state_dict=plain_state_dict(model))
    strategy = build_strategy(cfg)
    log_path = out / runlog.RUN_LOG
    first = 1
    cfg = replace(cfg, run_name=cfg.run_name or run_id)
    if cfg.resume:
        resumed = resume.restore(out, cfg, strategy)
        arrays, first = resumed.arrays, resumed.next_round
        cfg = replace(cfg, run_name=resumed.run_name or cfg.run_name)
    else:
        runlog.start(log_path)
    runlog.event(log_path, "grid", {"layers": layers(grid)})
    log.info("run %s: %d rounds of %s on %s, DP %s", run_id, cfg.num_server_rounds, cfg.strategy,
             cfg.model, f"target ε={cfg.dp_target_epsilon:g}" if cfg.dp_enabled else "off")
    started = time.monotonic()
    result = RoundResult(0)
    for server_round in range(first, cfg.num_server_rounds + 1):
        grid.wait_for_sites()
        try:
            arrays, result = play_round(grid, strategy, arrays, cfg, server_round)
        except BudgetsSpent as stop:
            log.warning("%s: the run ends after round %d", stop, server_round - 1)
            runlog.event(log_path, "stopped", {"round": server_round, "reason": str(stop), "refused": stop.refused})
            break
        runlog.append(log_path, result.to_json())
        resume.save_strategy(out, strategy, server_round)
        checkpoint.save(out / checkpoint.LAST, arrays.to_torch_state_dict(), cfg.to_mapping(),
                        server_round, result.to_json())
        log.info(progress_line(result, cfg.num_server_rounds, time.monotonic() - started))
    model_path = out / checkpoint.MODEL
    checkpoint.save(model_path, arrays.to_torch_state_dict(), cfg.to_mapping(), result.server_round,
                    result.to_json(), card=checkpoint.model_card(cfg, runlog.read(log_path)))
    log.info("global model: %s", model_path)
    return model_path


def play_round(grid: Grid, strategy: Strategy, arrays: ArrayRecord, cfg: RunConfig,
               server_round: int) -> tuple[ArrayRecord, RoundResult]:
    started = time.monotonic()
    result = RoundResult(server_round)
    config = ConfigRecord(cfg.to_mapping())
    replies = _send(grid, strategy.configure_train(server_round, arrays, config, grid), cfg)
    if cfg.update_dtype != "float32":
        _decode_updates(replies, arrays)
    refusals = [m for m in replies if not m.has_error() and STATUS in m.content]
    replies = [m for m in replies if m not in refusals]
    result.refused = [_refusal(m, server_round) for m in refusals]
    if cfg.validate_updates:
        replies, result.rejected = validation.validate(replies, arrays, cfg.update_norm_ratio)
        for r in result.rejected:
            log.warning("round %d: update from site %s rejected: %s", server_round, r["node"], r["reason"])
    result.sites_ok = sum(not m.has_error() for m in replies)
    result.sites_failed = len(replies) - result.sites_ok
    result.sites = [_site_privacy(m) for m in replies if not m.has_error()]
    new_arrays, train_metrics = strategy.aggregate_train(server_round, replies) if result.sites_ok else (None, None)
    if result.refused and not replies:
        raise BudgetsSpent(f"round {server_round}: every site refused to train, its privacy budget spent",
                           result.refused)
    if new_arrays is None:
        reasons = sorted({m.error.reason for m in replies if m.has_error()})
        if result.refused:
            reasons.append(f"{len(result.refused)} refused: privacy budget spent")
        if result.rejected:
            reasons.append(f"{len(result.rejected)} rejected by validation: {result.rejected[0]['reason']}")
        raise FedhospError(
            f"round {server_round}: no site returned an update ({'; '.join(reasons) or 'no reply in time'}); "
            "check the sites' logs"
        )
    arrays = _like(new_arrays, arrays)
    result.train = dict(train_metrics or {})
    if cfg.client_dp != "off":
        result.train["client-epsilon"] = client_epsilon(strategy, cfg, server_round)
    replies = _send(grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(cfg.to_mapping()), grid), cfg)
    result.site_scores = [_site_scores(m) for m in replies if not m.has_error()]
    result.evaluate = dict(strategy.aggregate_evaluate(server_round, replies) or {})
    result.seconds = time.monotonic() - started
    return arrays, result


def _like(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """The aggregate in the model's own dtypes: FedAdam & co. return float64, and every later round
    (sites, validation, checkpoints) expects the model's float32."""
    if all(new[k].dtype == old[k].dtype for k in old):
        return new
    return ArrayRecord({k: Array(new[k].numpy().astype(old[k].numpy().dtype)) for k in old})


def _decode_updates(replies: list[Message], base: ArrayRecord) -> None:
    """Sites on float16 transport send updates: back to weights, in the model's dtypes, before anything else."""
    for msg in replies:
        if not msg.has_error() and "arrays" in msg.content:
            msg.content["arrays"] = transport.decode(msg.content["arrays"], base)


def _refusal(msg: Message, server_round: int) -> dict[str, Any]:
    status = dict(msg.content[STATUS])
    log.warning("round %d: site %s refused to train (%s: ε %.3f spent, budget %g)", server_round,
                msg.metadata.src_node_id, status.get(STATUS), status.get("epsilon-total", float("nan")),
                status.get("privacy-budget", float("nan")))
    return {"node": msg.metadata.src_node_id, **status}


def _site_privacy(msg: Message) -> dict[str, Any]:
    metrics = next(iter(msg.content.metric_records.values()), {})
    keys = ("epsilon", "epsilon-total")
    return {"node": msg.metadata.src_node_id, **{k: float(metrics[k]) for k in keys if k in metrics}}


def _site_scores(msg: Message) -> dict[str, Any]:
    """One site's held-out metrics (global and personalized): the report's per-site view."""
    metrics = next(iter(msg.content.metric_records.values()), {})
    return {"node": msg.metadata.src_node_id, **{k: float(v) for k, v in metrics.items()
                                                  if k not in ("site-weight", "auc-weight")}}


def client_epsilon(strategy: Strategy, cfg: RunConfig, server_round: int) -> float:
    """Client-level ε after `server_round` releases: every sampled site counted, no amplification."""
    sigma = float(getattr(strategy, "noise_multiplier", cfg.client_dp_noise_multiplier))
    return privacy.epsilon([(sigma, 1.0, server_round)], cfg.dp_target_delta)


def _send(grid: Grid, messages, cfg: RunConfig) -> list[Message]:
    return list(grid.send_and_receive(messages=messages, timeout=cfg.round_timeout_s))


def progress_line(result: RoundResult, rounds: int, elapsed: float) -> str:
    ev, tr = result.evaluate, result.train
    eta = elapsed / result.server_round * (rounds - result.server_round)
    parts = [f"round {result.server_round}/{rounds}", f"loss {ev.get('loss', float('nan')):.4f}"]
    parts += [f"{short} {ev[key]:.3f}" for key, short in SHOWN if key in ev]
    if "epsilon-max" in tr:
        parts.append(f"eps_max {tr['epsilon-max']:.2f}")
    notes = [f"{len(v)} {name}" for name, v in (("refused", result.refused), ("rejected", result.rejected)) if v]
    total = result.sites_ok + result.sites_failed + len(result.refused) + len(result.rejected)
    parts += [f"sites {result.sites_ok}/{total}" + (f" ({', '.join(notes)})" if notes else ""),
              f"{elapsed:.0f}s elapsed, eta {eta:.0f}s"]
    return " | ".join(parts)
