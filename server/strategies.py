"""Strategy factory: a run's `strategy` name and options become a Flower strategy."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from common.config import RunConfig
from common.errors import ConfigError

WEIGHT_KEY = "num-examples"
MAX_KEYS = ("epsilon", "noise-multiplier")  # a privacy guarantee is the worst site's, not the mean
WEIGHTED_BY = {"auc": "auc-weight"}  # AUC only from sites whose split holds both classes


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted means, except ε (max over sites) and AUC (weighted by its own key)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    out: dict[str, float | int] = {weight_key: int(sum(m[weight_key] for m in metrics)), "sites": len(metrics)}
    for key in metrics[0]:
        if key == weight_key or key in WEIGHTED_BY.values():
            continue
        if key in MAX_KEYS:
            out[f"{key}-max"] = max(float(m[key]) for m in metrics)
            continue
        wkey = WEIGHTED_BY.get(key, weight_key)
        total = sum(float(m[wkey]) for m in metrics)
        if total > 0:
            out[key] = sum(float(m[key]) * float(m[wkey]) for m in metrics) / total
    return MetricRecord(out)


def build_strategy(cfg: RunConfig) -> Strategy:
    if cfg.strategy == "fedavg":
        return FedAvg(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=cfg.min_available_sites,
            weighted_by_key=WEIGHT_KEY,
            train_metrics_aggr_fn=aggregate_metrics,
            evaluate_metrics_aggr_fn=aggregate_metrics,
        )
    raise ConfigError(f"unknown strategy '{cfg.strategy}': choose fedavg")
