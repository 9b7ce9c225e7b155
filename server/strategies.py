"""Strategy factory: a run's `strategy` name and options become a Flower strategy.

Client-level DP wraps the strategy in Flower's server-side clipping wrappers: each
site's update is clipped to a norm and Gaussian noise is added to the average, so
the released model hides whether any one hospital took part at all. The noise is
calibrated to a plain mean of clipped updates, so under client-level DP updates are
averaged uniformly (weighted by `site-weight` = 1), not by example count.
"""

from __future__ import annotations

import math

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from common.config import RunConfig
from common.errors import ConfigError

WEIGHT_KEY = "num-examples"
UNIFORM_KEY = "site-weight"  # every site sends 1: client-level DP needs an unweighted mean
MAX_KEYS = ("epsilon", "epsilon-total", "noise-multiplier")  # a privacy guarantee is the worst site's, not the mean
WEIGHTED_BY = {"auc": "auc-weight"}  # AUC only from sites whose split holds both classes


def aggregate_metrics(records: list[RecordDict], weight_key: str = WEIGHT_KEY) -> MetricRecord:
    """Example-weighted means, except ε (max over sites) and AUC (weighted by its own key).

    Metrics are always weighted by example count, whatever key weights the arrays.
    """
    weight_key = WEIGHT_KEY
    metrics = [next(iter(r.metric_records.values())) for r in records]
    out: dict[str, float | int] = {weight_key: int(sum(m[weight_key] for m in metrics)), "sites": len(metrics)}
    for key in metrics[0]:
        if key in (weight_key, UNIFORM_KEY) or key in WEIGHTED_BY.values():
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
    if cfg.strategy != "fedavg":
        raise ConfigError(f"unknown strategy '{cfg.strategy}': choose fedavg")
    strategy = FedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.min_available_sites,
        weighted_by_key=UNIFORM_KEY if cfg.client_dp != "off" else WEIGHT_KEY,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
    )
    return with_client_dp(strategy, cfg)


def sampled_sites(cfg: RunConfig) -> int:
    """Sites per round the client-level noise is calibrated for: set min-available-sites to the consortium."""
    return max(1, math.ceil(cfg.fraction_train * cfg.min_available_sites))


def with_client_dp(strategy: Strategy, cfg: RunConfig) -> Strategy:
    if cfg.client_dp == "fixed":
        return DifferentialPrivacyServerSideFixedClipping(
            strategy, cfg.client_dp_noise_multiplier, cfg.client_dp_clipping_norm, sampled_sites(cfg)
        )
    if cfg.client_dp == "adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, cfg.client_dp_noise_multiplier, sampled_sites(cfg),
            initial_clipping_norm=cfg.client_dp_clipping_norm,
        )
    return strategy
