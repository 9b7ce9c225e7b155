"""The two questions a federation must answer to: would pooling the data do better, and each site alone?

- pooled: one model trained on the union of every site's training split, as if the data
  could be centralized;
- local-only: each site trains its own model on its own training split.
Both use the federation's model, its round-1 weights (the server's: the same seed, the run's
`pretrained` weights and channels), its `trainable` blocks, optimizer settings and total
epochs (rounds x local epochs), DP-SGD at the same target (epsilon, delta) when the federation
has DP, and they are scored on exactly what the federation is scored on: each site's validation
split, aggregated as the server aggregates it, and the source's test split.
In-process with common.training: no Flower, no Ray.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from typing import Any

import torch
from flwr.app import MetricRecord, RecordDict
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from client.site import Site, site_from_context
from common import decision, drift, privacy, training
from common.config import RunConfig, site_name
from common.models import input_channels
from common.models.trainable import freeze
from common.weights import to_record
from server import app as server_app
from server.strategies import aggregate_metrics
from simulation import central
from simulation.central import TestSet

log = logging.getLogger(__name__)
SCORES = ("loss", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "auc", "dice", "iou")
AT_THRESHOLD = ("threshold", "threshold-balanced-accuracy", "threshold-sensitivity", "threshold-specificity")


def run(cfg: RunConfig, sites: int, test: TestSet | None) -> dict[str, Any]:
    virtual = [site_from_context(cfg, {"partition-id": pid}) for pid in range(sites)]
    return {"pooled": pooled(cfg, virtual, test), "local": local(cfg, virtual, test)}


def pooled(cfg: RunConfig, sites: list[Site], test: TestSet | None) -> dict[str, Any]:
    started = time.monotonic()
    train_set = ConcatDataset([s.data()[0] for s in sites])
    model, epsilon = fit(cfg, train_set, "pooled")
    per_site = [site_scores(s, model) for s in sites]
    result = {
        "epochs": cfg.num_server_rounds * cfg.local_epochs,
        "train-examples": len(train_set),
        "epsilon": epsilon,
        "sites": pooled_scores(per_site),
        "per-site": [{"site": site_name(i), **_shown(m)} for i, m in enumerate(per_site)],
        "test": _test(central.evaluate(model, test, cfg.task, _channels(cfg))) if test is not None else None,
    }
    log.info("baseline pooled: %s (%.0fs)", _brief(result), time.monotonic() - started)
    return {**result, "seconds": round(time.monotonic() - started, 1)}


def local(cfg: RunConfig, sites: list[Site], test: TestSet | None) -> dict[str, Any]:
    started = time.monotonic()
    per_site, tests, epsilons = [], [], []
    for i, site in enumerate(sites):
        model, epsilon = fit(cfg, site.data()[0], f"local:{i}")
        per_site.append(site_scores(site, model))
        epsilons.append(epsilon)
        if test is not None:
            tests.append(_test(central.evaluate(model, test, cfg.task, _channels(cfg))))
    result: dict[str, Any] = {
        "epochs": cfg.num_server_rounds * cfg.local_epochs,
        "epsilon-max": max(epsilons) if cfg.dp_enabled else None,
        "sites": pooled_scores(per_site),
        "per-site": [{"site": site_name(i), **_shown(m)} for i, m in enumerate(per_site)],
        "test": _mean(tests) if tests else None,
        "test-per-site": [{"site": site_name(i), **t} for i, t in enumerate(tests)],
    }
    log.info("baseline local-only: %s (%.0fs)", _brief(result), time.monotonic() - started)
    return {**result, "seconds": round(time.monotonic() - started, 1)}


def fit(cfg: RunConfig, train_set: Dataset, name: str) -> tuple[torch.nn.Module, float | None]:
    """The federation's round-1 model (the server's own, `pretrained` weights included), trained
    rounds x local-epochs epochs on `train_set` with the sites' `trainable`, optimizer and loss."""
    model = initial_model(cfg)
    trained = _trainable(model, cfg)
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}:baseline:{name}".encode()).digest()[:8], "big") % 2**63
    torch.manual_seed(seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = drift.make_optimizer(cfg.optimizer, trained, lr=cfg.learning_rate, momentum=cfg.momentum)
    epochs = cfg.num_server_rounds * cfg.local_epochs
    device = training.pick_device("auto")
    model.to(device)
    if not cfg.dp_enabled:
        training.train(model, loader, optimizer, epochs, device, training.loss_for(cfg.task, cfg.loss_weights))
        return model, None
    dp = privacy.plan(cfg.dp_target_epsilon, cfg.dp_target_delta, len(train_set), cfg.batch_size, epochs, 1,
                      cfg.dp_max_grad_norm)
    engine, module, optimizer, loader = privacy.make_private(model, optimizer, loader, dp)
    training.train(module, loader, optimizer, epochs, device, training.loss_for(cfg.task, cfg.loss_weights))
    return model, privacy.epsilon([tuple(h) for h in engine.accountant.history], dp.delta)


def initial_model(cfg: RunConfig) -> torch.nn.Module:
    """What the server starts round 1 from (server/app.py): the same seed, the run's channels, its
    `pretrained` weights; never a resumed run's checkpoint (a baseline trains from the start)."""
    torch.manual_seed(cfg.seed)  # server/app.py `run` seeds exactly so before building it
    return server_app.initial_model(replace(cfg, resume=False))


def _trainable(model: torch.nn.Module, cfg: RunConfig) -> list[torch.nn.Parameter]:
    """The run's `trainable` blocks, as a site sets them (client/site.py): the rest frozen, not optimised."""
    freeze(model, cfg.trainable)
    return [p for p in model.parameters() if p.requires_grad]


def _channels(cfg: RunConfig) -> int:
    return input_channels(cfg.task, cfg.model, cfg.channels)


def site_scores(site: Site, model: torch.nn.Module) -> dict[str, Any]:
    """What the site would reply for this model: its validation split, scored by its own code."""
    plain = replace(site, run=replace(site.run, local_norm=False, fine_tune_epochs=0))
    return plain.evaluate(to_record(model))


def pooled_scores(per_site: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregated with the server's own metric aggregation, as the federation's evaluate replies are
    (two classes: the sites' confusion counts pooled, and the threshold chosen there, common/decision.py)."""
    merged = decision.summarise(aggregate_metrics([RecordDict({"metrics": MetricRecord(m)}) for m in per_site]),
                                decision.total(per_site))
    return {k: float(v) for k, v in merged.items() if k in (*SCORES, *AT_THRESHOLD, "num-examples")}


def _test(scores: dict[str, Any]) -> dict[str, Any]:
    """The test split's scores without its confusion grid (the federation's report uses that)."""
    return {k: v for k, v in scores.items() if k != "counts"}


def _shown(metrics: dict[str, Any]) -> dict[str, Any]:
    metrics = decision.summarise(metrics)
    out = {k: float(metrics[k]) for k in SCORES if k in metrics}
    if metrics.get("auc-weight") == 0:
        out.pop("auc", None)  # a single-class validation split has no AUC
    return {"num-examples": int(metrics["num-examples"]), **out}


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in SCORES if all(k in r for r in rows)]
    out: dict[str, Any] = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    out.update({f"{k}-min": min(r[k] for r in rows) for k in keys if k != "loss"})
    return out


def _brief(result: dict[str, Any]) -> str:
    shown = ("accuracy", "balanced-accuracy", "auc", "dice")
    parts = [f"sites {k} {v:.3f}" for k, v in result["sites"].items() if k in shown]
    if result.get("test"):
        parts += [f"test {k} {v:.3f}" for k, v in result["test"].items() if k in shown]
    return ", ".join(parts)
