"""Strategy factory: a run's `strategy` name and options become a Flower strategy.

Every strategy but SCAFFOLD is Flower's own (flwr.serverapp.strategy); SCAFFOLD is ours
(server/scaffold.py), as Flower has none. FedProx's proximal term is applied by the sites
(common/drift.py) with the μ Flower's FedProx sends each round.

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
    Bulyan,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.config import RunConfig
from common.errors import ConfigError
from server.scaffold import Scaffold

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


# Which strategies may carry client-level DP: Flower's wrappers calibrate noise to a plain mean
# of clipped updates, and the mean must be what is released. Median, trimmed mean, Krum and
# Bulyan are not means; FedAdam/FedYogi/FedAdagrad feed the un-noised mean into server optimizer
# state; SCAFFOLD sends a second, unclipped update (delta c). Sample-level DP-SGD composes with
# every strategy: aggregation is post-processing of the sites' DP outputs.
CLIENT_DP_STRATEGIES = ("fedavg", "fedprox")
# Which strategies run on a secure sum (server/secagg.py): a weighted mean, and the server optimizers fed
# by it. Median, trimmed mean, Krum and Bulyan rank individual updates; SCAFFOLD needs each site's delta c;
# client-level DP clips each site's update on the server. None of those exists under SecAgg+.
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")


def build_strategy(cfg: RunConfig) -> Strategy:
    check_combination(cfg)
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.min_available_sites,
        weighted_by_key=UNIFORM_KEY if cfg.client_dp != "off" else WEIGHT_KEY,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
    )
    server_opt = dict(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, tau=cfg.server_tau)
    factories = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=cfg.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **server_opt, beta_1=cfg.server_beta1, beta_2=cfg.server_beta2),
        "fedyogi": lambda: FedYogi(**common, **server_opt, beta_1=cfg.server_beta1, beta_2=cfg.server_beta2),
        "fedadagrad": lambda: FedAdagrad(**common, **server_opt),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=cfg.trimmed_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=cfg.num_malicious_sites),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=cfg.num_malicious_sites),
        "scaffold": lambda: Scaffold(**common, total_sites=cfg.min_available_sites),
    }
    return with_client_dp(factories[cfg.strategy](), cfg)


def check_combination(cfg: RunConfig) -> None:
    """Refuse, before round 1, settings that would run but not mean what they say."""
    if cfg.client_dp != "off" and cfg.strategy not in CLIENT_DP_STRATEGIES:
        raise ConfigError(
            f"client-dp = {cfg.client_dp} does not compose with strategy = {cfg.strategy}: its noise is "
            f"calibrated for a mean of clipped updates; use {' or '.join(CLIENT_DP_STRATEGIES)}, or client-dp = off"
        )
    if cfg.secure_aggregation != "off" and (cfg.strategy not in SECAGG_STRATEGIES or cfg.client_dp != "off"):
        what = f"strategy = {cfg.strategy}" if cfg.strategy not in SECAGG_STRATEGIES else f"client-dp = {cfg.client_dp}"
        raise ConfigError(
            f"secure-aggregation = {cfg.secure_aggregation} does not compose with {what}: it needs each site's "
            f"own update, and the server sees only their sum; use {' | '.join(SECAGG_STRATEGIES)} with "
            "client-dp = off, or secure-aggregation = off"
        )
    if cfg.strategy == "scaffold" and cfg.momentum != 0:
        raise ConfigError(f"strategy = scaffold assumes plain local SGD: set momentum = 0 (now {cfg.momentum:g})")
    if cfg.proximal_mu and cfg.strategy != "fedprox":
        raise ConfigError(f"proximal-mu = {cfg.proximal_mu:g} only acts with strategy = fedprox")
    f, n = cfg.num_malicious_sites, cfg.min_available_sites
    needed = {"krum": 2 * f + 3, "bulyan": 4 * f + 3}.get(cfg.strategy)
    if needed is not None and n < needed:
        raise ConfigError(
            f"strategy = {cfg.strategy} with num-malicious-sites = {f} needs at least {needed} sites per round; "
            f"min-available-sites is {n}"
        )


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
