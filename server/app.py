"""The Flower ServerApp: parse the run's config once, run the rounds, checkpoint each one.

The round loop is ours rather than `Strategy.start`, for three reasons: a run log
line and a checkpoint after every round (so a crash loses no finished round), one
progress line per round, and a clear stop when every site fails. The strategy
still does all sampling and aggregation. No one site's reply can end the run: each is
screened on its own (server/validation.py), and an aggregate that fails or is not finite
fails only its round, the global model kept as it was.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from common import decision, privacy
from common.config import RunConfig
from common.errors import FedhospError
from common.flower_compat import strategy_state, waits
from common.grid_layer import layers
from common.logs import ensure_console
from common.models import build_model, input_channels, pretrained
from common.protocol import POLICY_REFUSED, REFUSED_SETTING, STATUS
from common.weights import plain_state_dict
from server import checkpoint, resume, runlog, secagg, validation
from server.assembly import compose
from server.strategies import build_strategy
from server.waiting import WaitingGrid

log = logging.getLogger(__name__)
SHOWN = (("accuracy", "acc"), ("balanced-accuracy", "bacc"), ("sensitivity", "sens"), ("specificity", "spec"),
         ("auc", "auc"), ("dice", "dice"), ("iou", "iou"))


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
    rejected: list[dict[str, Any]] = field(default_factory=list)  # replies that failed validation, by phase
    failed: str = ""  # why the round's aggregate was discarded (the global model stayed as it was)
    site_scores: list[dict[str, Any]] = field(default_factory=list)  # per site: held-out metrics
    seconds: float = 0.0

    @property
    def rejected_updates(self) -> list[dict[str, Any]]:
        """The train replies rejected: sites whose update (or refusal) did not count this round."""
        return [r for r in self.rejected if r.get("phase", "train") == "train"]

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
            "sites_rejected": len(self.rejected_updates),
            "rejected": self.rejected,
            "failed": self.failed or None,
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
    arrays = ArrayRecord(torch_state_dict=plain_state_dict(initial_model(cfg)))
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


def initial_model(cfg: RunConfig) -> torch.nn.Module:
    """The round-1 global model: the registry's, with the run's `pretrained` weights loaded here, on the
    server only (common/models/pretrained.py): sites receive them as the global model and never read the
    file. A resumed run takes its weights from the checkpoint instead."""
    model = build_model(cfg.task, cfg.model, input_channels(cfg.task, cfg.model, cfg.channels), cfg.num_classes,
                        cfg.image_size)
    if cfg.pretrained and not cfg.resume:
        loaded = pretrained.load(model, cfg.pretrained, cfg.task, cfg.model)
        log.info("round-1 model: pretrained %s (sha256 %s)", cfg.pretrained, loaded.sha256[:16])
    return model


def play_round(grid: Grid, strategy: Strategy, arrays: ArrayRecord, cfg: RunConfig,
               server_round: int) -> tuple[ArrayRecord, RoundResult]:
    """One round: every reply screened on its own (server/validation.py), the accepted ones aggregated,
    the aggregate kept only if finite (else the round fails and the global model stays as it was)."""
    started = time.monotonic()
    result = RoundResult(server_round)
    limits = validation.Limits.of(cfg)
    config = ConfigRecord(cfg.to_mapping())
    messages = strategy.configure_train(server_round, arrays, config, grid)
    if cfg.secure_aggregation == "off":
        screened, secagg_failed = validation.screen_train(_send(grid, messages, cfg), arrays, limits), ""
    else:  # four message rounds; the replies carry only global + the unmasked mean (server/secagg.py)
        screened, secagg_failed = secagg.train(grid, messages, arrays, cfg, server_round)
    replies, result.rejected = screened.accepted, screened.rejected
    result.refused = [_refusal(m, server_round) for m in screened.refusals]
    result.sites_ok = sum(not m.has_error() for m in replies)
    result.sites_failed = len(replies) - result.sites_ok
    result.sites = [_site_privacy(m) for m in replies if not m.has_error()]
    if result.refused and not replies:
        raise BudgetsSpent(f"round {server_round}: every site refused to train (its privacy budget spent or "
                           "its policy)", result.refused)
    new_arrays, train_metrics, result.failed = (_aggregate(strategy, server_round, replies)
                                                if result.sites_ok and not secagg_failed
                                                else (None, None, secagg_failed))
    if new_arrays is None and not result.failed:
        raise FedhospError(f"round {server_round}: no site returned an update ({_why_none(replies, result)}); "
                           "check the sites' logs")
    if new_arrays is not None:
        arrays = _like(new_arrays, arrays)
    result.train = dict(train_metrics or {})
    if cfg.client_dp != "off" and not result.failed:
        result.train["client-epsilon"] = client_epsilon(strategy, cfg, server_round)
    screened = validation.screen_evaluate(
        _send(grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(cfg.to_mapping()), grid), cfg),
        limits)
    result.rejected += screened.rejected
    for msg in screened.refusals:
        _refusal(msg, server_round, "evaluate")
    result.site_scores = [_site_scores(m) for m in screened.accepted if not m.has_error()]
    result.evaluate = decision.summarise(_aggregate_evaluate(strategy, server_round, screened.accepted),
                                         decision.total(_metrics(m) for m in screened.accepted if not m.has_error()))
    for r in result.rejected:
        log.warning("round %d: %s reply from site %s rejected (%s): %s", server_round, r["phase"], r["node"],
                    r["class"], r["reason"])
    result.seconds = time.monotonic() - started
    return arrays, result


def _why_none(replies: list[Message], result: RoundResult) -> str:
    reasons = sorted({m.error.reason for m in replies if m.has_error()})
    if result.refused:
        reasons.append(f"{len(result.refused)} refused: privacy budget spent")
    if result.rejected:
        reasons.append(f"{len(result.rejected)} rejected by validation: {result.rejected[0]['reason']}")
    return "; ".join(reasons) or "no reply in time"


def _aggregate(strategy: Strategy, server_round: int,
               replies: list[Message]) -> tuple[ArrayRecord | None, Mapping[str, Any] | None, str]:
    """(aggregate, metrics, "") or (None, None, why the round failed): an aggregate that raises or holds
    NaN/inf is discarded and the strategy's state (FedAdam's moments, SCAFFOLD's c) put back as it was,
    so no checkpoint ever holds it and the next round starts from the last good model."""
    before = _snapshot(strategy)
    try:
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    except Exception as exc:  # the replies passed validation: whatever breaks now fails this round only
        log.exception("round %d: aggregation failed", server_round)
        failed = f"aggregation failed: {type(exc).__name__}: {exc}"
    else:
        failed = _non_finite(new_arrays) if new_arrays is not None else ""
        if not failed:
            return new_arrays, metrics, ""
    _restore(before)
    log.error("round %d failed, the global model stays as it was: %s", server_round, failed)
    return None, None, failed


def _non_finite(arrays: ArrayRecord) -> str:
    bad = [k for k in arrays if not np.isfinite(arrays[k].numpy()).all()]
    return f"non-finite aggregate: {', '.join(bad[:3])}" if bad else ""


def _snapshot(strategy: Strategy) -> list[tuple[Strategy, dict[str, Any]]]:
    """Deep copies of what every layer of the strategy carries between rounds (strategy_state.STATEFUL)."""
    return [(layer, {name: copy.deepcopy(getattr(layer, name)) for name in strategy_state.STATEFUL
                     if hasattr(layer, name)}) for layer in strategy_state.layers(strategy)]


def _restore(snapshot: list[tuple[Strategy, dict[str, Any]]]) -> None:
    for layer, state in snapshot:
        for name, value in state.items():
            setattr(layer, name, value)


def _aggregate_evaluate(strategy: Strategy, server_round: int, replies: list[Message]) -> dict[str, Any]:
    try:
        return dict(strategy.aggregate_evaluate(server_round, replies) or {})
    except Exception:  # the scores of one round are not worth the run
        log.exception("round %d: aggregating the evaluation failed", server_round)
        return {}


def _like(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """The aggregate in the model's own dtypes: FedAdam & co. return float64, and every later round
    (sites, validation, checkpoints) expects the model's float32."""
    if all(new[k].dtype == old[k].dtype for k in old):
        return new
    return ArrayRecord({k: Array(new[k].numpy().astype(old[k].numpy().dtype)) for k in old})


def _refusal(msg: Message, server_round: int, what: str = "train") -> dict[str, Any]:
    status = dict(msg.content[STATUS])
    if status.get(STATUS) == POLICY_REFUSED:
        why = f"its policy does not accept the run's {status.get(REFUSED_SETTING)}: see the site's log"
    else:
        why = (f"{status.get(STATUS)}: ε {status.get('epsilon-total', float('nan')):.3f} spent, "
               f"budget {status.get('privacy-budget', float('nan')):g}")
    log.warning("round %d: site %s refused to %s (%s)", server_round, msg.metadata.src_node_id, what, why)
    return {"node": msg.metadata.src_node_id, **status}


def _site_privacy(msg: Message) -> dict[str, Any]:
    metrics = next(iter(msg.content.metric_records.values()), {})
    keys = ("epsilon", "epsilon-total")
    return {"node": msg.metadata.src_node_id, **{k: float(metrics[k]) for k in keys if k in metrics}}


def _metrics(msg: Message) -> Mapping[str, Any]:
    return next(iter(msg.content.metric_records.values()), {})


def _site_scores(msg: Message) -> dict[str, Any]:
    """One site's held-out metrics (global and personalized; two classes: its confusion grid summarised,
    common/decision.py): the report's per-site view."""
    metrics = decision.summarise(_metrics(msg))
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
    if "threshold" in ev:  # two classes: the pooled validation's best threshold (common/decision.py)
        parts.append(f"at {ev['threshold']:.3g}: bacc {ev.get('threshold-balanced-accuracy', float('nan')):.3f}")
    if "epsilon-max" in tr:
        parts.append(f"eps_max {tr['epsilon-max']:.2f}")
    rejected = result.rejected_updates
    notes = [f"{len(v)} {name}" for name, v in (("refused", result.refused), ("rejected", rejected)) if v]
    notes += ["aggregate discarded"] if result.failed else []
    total = result.sites_ok + result.sites_failed + len(result.refused) + len(rejected)
    parts += [f"sites {result.sites_ok}/{total}" + (f" ({', '.join(notes)})" if notes else ""),
              f"{elapsed:.0f}s elapsed, eta {eta:.0f}s"]
    return " | ".join(parts)
