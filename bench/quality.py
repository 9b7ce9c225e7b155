"""Quality under DP (issue 20): which recipe learns BreastMNIST at ~100 images a site, not just its majority class.

BreastMNIST (breast ultrasound, 28 px; ../shared/data/breastmnist) split over 5 sites by
Dirichlet(0.5), DP-SGD at ε = 8, δ = 1e-5 per site, scored on its official test split (156
images, 73% benign): balanced accuracy, AUC, sensitivity (malignant), specificity. Each recipe
runs federated (`fedhosp simulate`, in-process engine), pooled and local-only (the baselines'
own `fit`: same model, initial weights, epochs and DP), over seeds. Recipes: the small CNN;
scattering features with a linear or CNN head (no weights needed); and, where the tree has
`pretrained` / `trainable`, registry models started from weights `fedhosp pretrain` made on a
public pool that is not the task's data (kneeoa: knee X-rays; pbcblood: blood-cell microscopy).
Accuracy alone hides collapse: predicting "benign" for all scores 0.731 with balanced accuracy 0.5.

Usage: python -m bench.quality [--seeds 0,1,2] [--recipes cnn,scatter-linear,...] [--rounds 30]
       [--work runs/quality] [--out FILE];  python -m bench.quality --doc RESULTS.json (docs/simulation.md)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import doc_block
from common import decision

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TASK_DATA = DATA / "breastmnist" / "breastmnist.npz"
POOLS = {"kneeoa": DATA / "kneeoa" / "kneeoa.npz", "pbcblood": DATA / "pbcblood" / "pbcblood.npz"}
SITES, ALPHA, EPSILON, DELTA = 5, 0.5, 8.0, 1e-5
SETTINGS = {"image-size": 28, "batch-size": 32, "local-epochs": 1, "dp-target-delta": DELTA}
ROUNDS = 30
PRETRAIN_EPOCHS = 3
# `fedhosp pretrain`'s learning rate (SGD, momentum 0.9): its default 0.05 suits the small CNN; resnet18 (GroupNorm)
# diverged with it (3 epochs on pbcblood: train loss 3.30 > ln 8, test accuracy 0.211 over 8 classes)
PRETRAIN_LR = {"resnet18": 0.01}
METRICS = ("balanced-accuracy", "auc", "sensitivity", "specificity", "accuracy")
# The same at the decision threshold each model was given (`threshold`): the federation's from its model card,
# a baseline's from its own training data's validation split, chosen the same way (common/decision.py).
DECIDED = ("threshold", *(f"threshold-{m}" for m in METRICS if m != "auc"))
ALL_METRICS = (*METRICS, *DECIDED)
KINDS = ("federated", "pooled", "local")
GOAL = {"balanced-accuracy": 0.70, "auc": 0.85}
PUBLISHED = "centralized ResNet-18 (28), no DP, MedMNIST v2: ACC 0.863, AUC 0.901"
DOC = ROOT / "docs" / "simulation.md"
DOC_NAME = "bench/quality.py"  # docs/simulation.md's generated block (bench/doc_block.py)
DOC_BEGIN, DOC_END = doc_block.markers(DOC_NAME)


@dataclass(frozen=True)
class Recipe:
    name: str  # MODEL[@POOL/TRAINABLE]
    model: str
    settings: dict[str, Any] = field(default_factory=dict)  # run-config keys on top of SETTINGS
    pool: str | None = None  # pretrained on this public pool (fedhosp pretrain), then `pretrained = PATH`
    trainable: str | None = None  # with a pool: `trainable = head | all`
    rounds: int | None = None  # its own number of rounds (None: ROUNDS); `--rounds` overrides every recipe's

    @property
    def distributed(self) -> bool:
        """`dp-mode = distributed` (docs/secure-aggregation.md): the noise of the sum is sized per run."""
        return self.settings.get("dp-mode") == "distributed"


DISTRIBUTED = {"batch-size": 1024, "dp-mode": "distributed", "secure-aggregation": "secaggplus", "secagg-threshold": 3}
# Learning rates: the best of 0.05 / 0.2 / 0.5 for DP pooled training at seed 0 (cnn: the one docs/simulation.md used)
RECIPES = (
    Recipe("cnn", "cnn", {"learning-rate": 0.01}),
    Recipe("scatter-linear", "scatter-linear", {"learning-rate": 0.2}),
    Recipe("scatter-cnn", "scatter-cnn", {"learning-rate": 0.05}),
    Recipe("cnn@pbcblood/head", "cnn", {"learning-rate": 0.2}, "pbcblood", "head"),
    Recipe("cnn@pbcblood/all", "cnn", {"learning-rate": 0.01}, "pbcblood", "all"),
    Recipe("resnet18@pbcblood/head", "resnet18", {"learning-rate": 0.2}, "pbcblood", "head"),
    Recipe("resnet18@pbcblood/all", "resnet18", {"learning-rate": 0.01}, "pbcblood", "all"),
    # Distributed DP under SecAgg+ (3 of 5 sites), one full-batch DP-SGD step a round: a batch-size above every
    # site's training split makes each site's Poisson rate q = 1, so no small site forces the noise of the sum up
    # (sized for the largest q_k). Learning rate: 0.5 of 0.5 / 1.0 at seed 0 (batch 32: 0.25 of 1 / 0.5 / 0.25).
    Recipe("scatter-linear:distributed", "scatter-linear", {"learning-rate": 0.5, **DISTRIBUTED}, rounds=100),
    # The scattering front's per-channel statistics from the public pool (scatter.py `calibrate`), frozen
    # (learning rates at seed 0, federated: local 0.05 of 0.05 / 0.2 / 0.5; distributed 0.25 of 0.1 / 0.25)
    Recipe("scatter-linear@pbcblood/head", "scatter-linear", {"learning-rate": 0.05}, "pbcblood", "head"),
    Recipe("scatter-linear@pbcblood/head:distributed", "scatter-linear", {"learning-rate": 0.25, **DISTRIBUTED},
           "pbcblood", "head", rounds=100),
)
QUICK = ("cnn", "scatter-linear")
LIGHT = ("cnn", "scatter-linear", "scatter-cnn")  # models a 2-core CPU trains in minutes


def unavailable(recipe: Recipe) -> str | None:
    """Why this tree cannot run the recipe (a model or setting not there yet), or None."""
    from dataclasses import fields

    from common.config import RunConfig
    from common.models import REGISTRY

    if recipe.model not in REGISTRY:
        return f"model {recipe.model!r} is not in this tree's registry"
    if recipe.pool is not None:
        keys = {f.name for f in fields(RunConfig)}
        if not {"pretrained", "trainable"} <= keys:
            return "this tree's RunConfig has no pretrained / trainable settings"
        if not POOLS[recipe.pool].is_file():
            return f"{POOLS[recipe.pool]} not found"
    return None


def weights_file(recipe: Recipe, work: Path) -> Path:
    return work / "weights" / f"{recipe.model}-{recipe.pool}.pt"


def weights_for(recipe: Recipe, work: Path, log: dict[str, Any]) -> Path:
    """`fedhosp pretrain` on the recipe's public pool, once per (model, pool)."""
    from simulation.pretrain import PretrainOptions, pretrain, sidecar

    assert recipe.pool is not None
    out = weights_file(recipe, work)
    if not (out.is_file() and sidecar(out).is_file()):
        lr = {"learning_rate": PRETRAIN_LR[recipe.model]} if recipe.model in PRETRAIN_LR else {}
        pretrain(PretrainOptions(data=POOLS[recipe.pool], model=recipe.model, out=out, epochs=PRETRAIN_EPOCHS,
                                 image_size=SETTINGS["image-size"], **lr))
    log[out.stem] = json.loads(sidecar(out).read_text())
    return out


def simulate_args(seed: int, rounds: int, out: Path, settings: dict[str, Any]):
    """`fedhosp simulate`'s arguments for BreastMNIST over the sites, in-process, with these run settings."""
    from fedhosp import cli

    return cli.build_parser().parse_args([
        "simulate", "--data", str(TASK_DATA), "--partition", "dirichlet", "--alpha", str(ALPHA),
        "--sites", str(SITES), "--rounds", str(rounds), "--epsilon", str(EPSILON), "--seed", str(seed),
        "--engine", "inprocess", "--out", str(out),
        "--run-config", " ".join(f"{k}={v}" for k, v in settings.items())])


def run_recipe(recipe: Recipe, seed: int, rounds: int, work: Path, weights: Path | None) -> dict[str, Any]:
    """Federated, pooled and local-only for one recipe and seed: each one's report on the test split, at
    0.5 and at its own decision threshold. The baselines' `fit` (simulation/baselines.py) starts from the
    federation's round-1 model, pretrained weights included, and trains the same `trainable` blocks, with
    central DP-SGD at the same ε (for a distributed recipe: the pooled step its sum emulates, and each site's)."""
    from client.site import site_from_context
    from fedhosp import cli

    settings = {**SETTINGS, **recipe.settings, "model": recipe.model}
    if weights is not None:
        settings.update({"pretrained": str(weights), "trainable": recipe.trainable})
    out = work / recipe.name.replace("@", "-").replace("/", "-") / f"seed-{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the sites' ledgers of an earlier one would count
    extra: dict[str, Any] = {}
    if recipe.distributed:
        from bench import distributed_dp

        extra = distributed_dp.calibrate(settings, seed, rounds, out)
        settings["dp-noise-multiplier"] = extra["sigma"]
    args = simulate_args(seed, rounds, out, settings)
    started = time.monotonic()
    results = json.loads(cli.run_simulate(args).read_text())
    cfg = cli.simulate_config(args)
    test = _test_set(cfg, out)
    model, threshold = _final_model(cfg, out)
    federated = _report(model, test, threshold, _channels(cfg))
    fed = {"federated": {**federated, "epsilon": results["final"].get("epsilon_max")},
           "sizes": results.get("partition", {}).get("sizes"), "config": _config(cfg), **extra}
    sites = [site_from_context(cfg, {"partition-id": pid}) for pid in range(SITES)]
    return {**fed, **_baselines(cfg, sites, test), "seconds": round(time.monotonic() - started, 1)}


def _config(cfg) -> dict[str, Any]:
    """The settings a recipe recommendation names (the run's, after the task's defaults)."""
    return {"model": cfg.model, "pretrained": Path(cfg.pretrained).name if cfg.pretrained else "",
            "trainable": cfg.trainable, "optimizer": cfg.optimizer, "learning-rate": cfg.learning_rate,
            "momentum": cfg.momentum, "batch-size": cfg.batch_size, "dp-max-grad-norm": cfg.dp_max_grad_norm,
            "local-epochs": cfg.local_epochs, "rounds": cfg.num_server_rounds, "dp-mode": cfg.dp_mode,
            "secure-aggregation": cfg.secure_aggregation, "secagg-threshold": cfg.secagg_threshold}


def _baselines(cfg, sites: list, test) -> dict[str, Any]:
    """Pooled and local-only, each decided at the threshold its own training data's validation split picks:
    pooled, the sites' validation splits pooled (as the federation's); a site alone, its own."""
    from torch.utils.data import ConcatDataset

    from simulation import baselines

    pooled_model, pooled_eps = baselines.fit(cfg, ConcatDataset([s.data()[0] for s in sites]), "pooled")
    pooled_t = baselines.pooled_scores([baselines.site_scores(s, pooled_model) for s in sites]).get("threshold")
    local = []
    for i, site in enumerate(sites):
        model = baselines.fit(cfg, site.data()[0], f"local:{i}")[0]
        own = decision.summarise(baselines.site_scores(site, model)).get("threshold")
        local.append(_report(model, test, own, _channels(cfg)))
    return {
        "pooled": {**_report(pooled_model, test, pooled_t, _channels(cfg)), "epsilon": pooled_eps},
        "local": {k: _mean([r.get(k) for r in local]) for k in ALL_METRICS},
        "local-worst": {k: _least([r.get(k) for r in local]) for k in ALL_METRICS if k != "threshold"},
    }


def _test_set(cfg, out: Path):
    from simulation import pool
    from simulation.central import TestSet

    data = pool.load(TASK_DATA, cfg.image_size, out / "pool-cache")
    return TestSet(data.test_images, data.test_labels)


def _channels(cfg) -> int:
    from common.models import input_channels

    return input_channels(cfg.task, cfg.model, cfg.channels)


def _final_model(cfg, out: Path):
    """The run's model.pt as `fedhosp predict` reads it: the model and its card's decision threshold."""
    from common.model_card import load_model
    from server import checkpoint

    card, model = load_model(out / checkpoint.MODEL)
    return model, card.threshold


def _report(model, test, threshold: float | None = None, channels: int = 1) -> dict[str, Any]:
    """The clinical metrics of the model on the test split (common.metrics: scikit-learn) at 0.5, and at
    `threshold` (None: 0.5 too, as `fedhosp predict` decides without one) as `threshold-*`."""
    import torch

    from common import metrics

    model.eval().cpu()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x), dim=1) for x, _ in test.loader(channels)]).numpy()
    at_half = _malignant_first(metrics.classification_report(test.labels, probs))
    decided = _malignant_first(metrics.classification_report(test.labels, probs, threshold))
    return {**{k: at_half[k] for k in METRICS}, "threshold": decision.DEFAULT if threshold is None else threshold,
            **{f"threshold-{k}": decided[k] for k in METRICS if k != "auc"}}


def _malignant_first(report: dict[str, Any]) -> dict[str, Any]:
    """common.metrics takes class 1 as the finding; BreastMNIST's class 1 is normal/benign, 0 malignant. The
    threshold stays on class 1's probability (the federation's, common/decision.py), so only the names swap:
    a higher threshold calls fewer images benign, more malignant (sensitivity up)."""
    return {**report, "sensitivity": report["specificity"], "specificity": report["sensitivity"]}


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _least(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe and kind: each metric's mean and spread (sample standard deviation) over the seeds."""
    out: dict[str, dict[str, Any]] = {}
    for name, per_seed in runs.items():
        done = [r for r in per_seed.values() if "error" not in r]
        if not done:
            continue
        out[name] = {}
        for kind in (k for k in KINDS if k in done[0]):
            out[name][kind] = {}
            for metric in ALL_METRICS:
                values = [r[kind][metric] for r in done if r[kind].get(metric) is not None]
                if values:
                    spread = statistics.stdev(values) if len(values) > 1 else 0.0
                    out[name][kind][metric] = {"mean": statistics.fmean(values), "spread": spread,
                                               "seeds": len(values)}
    return out


def decided(stats: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """A metric as the model decides (at its threshold), else at 0.5 (results from before thresholds; AUC)."""
    return stats.get(f"threshold-{metric}") or stats.get(metric)


def best(summary: dict[str, dict[str, Any]]) -> str | None:
    """The federated recipe with the highest mean balanced accuracy at its threshold (AUC breaks ties)."""
    def key(name: str) -> tuple[float, float]:
        fed = summary[name]["federated"]
        return ((decided(fed, "balanced-accuracy") or {}).get("mean", 0.0), fed.get("auc", {}).get("mean", 0.0))

    return max(summary, key=key) if summary else None


def met(stats: dict[str, Any]) -> bool:
    """The issue's goal, on the decided balanced accuracy and the AUC."""
    return all((decided(stats, m) or {}).get("mean", 0.0) >= v for m, v in GOAL.items())


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """bench/table.py rows: the federated figure of each recipe, the best against the issue's goal."""
    if "skipped-all" in r:
        return [("Quality", "skipped", r["skipped-all"], "", "")]
    out: list[tuple[str, str, str, str, str]] = []
    summary, top = r["summary"], r.get("best")
    seeds = ",".join(map(str, r["seeds"]))
    for name, kinds in summary.items():
        fed = kinds["federated"]
        shown = ", ".join(f"{m} {_cell(decided(fed, m))}" for m in ("balanced-accuracy", "auc"))
        goal = ""
        if name == top:
            goal = "met" if met(fed) else "MISSED"
        out.append(("Quality" if not out else "", f"BreastMNIST DP ε={r['epsilon']:g}, federated {name} "
                    f"({_seeds(kinds)} of seeds {seeds}){' [best]' if name == top else ''}", shown,
                    "bal. acc >= 0.70, AUC >= 0.85" if name == top else "", goal))
    for name, why in r.get("skipped", {}).items():
        out.append(("Quality" if not out else "", f"{name}: skipped", why[:100], "", ""))
    return out


def _seeds(kinds: dict[str, Any]) -> int:
    return kinds["federated"].get("balanced-accuracy", {}).get("seeds", 0)


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.3f} ± {stat['spread']:.3f}" if stat["seeds"] > 1 else f"{stat['mean']:.3f}"


def markdown(r: dict[str, Any]) -> str:
    """The table for docs/simulation.md: every recipe x (federated, pooled, local-only), test split."""
    seeds = ", ".join(map(str, r["seeds"]))
    lines = [
        f"*Generated by `python -m bench.quality --doc` from the results of {r['date']} (commit {r['commit']}); "
        "do not edit by hand.*", "",
        f"BreastMNIST over {SITES} sites by Dirichlet({ALPHA:g}) ({r['settings']}, {r['rounds']} rounds), DP-SGD "
        f"ε = {r['epsilon']:g}, δ = {r['delta']:g} at every site and in the pooled and local-only baselines, "
        f"official test split (156 images); mean ± standard deviation over seeds {seeds}. Sensitivity is "
        "for malignant, specificity for benign/normal; local-only is the mean of the sites' own models. "
        "*At t*: decided at the model's own threshold t on the benign score (common/decision.py: the best "
        "balanced accuracy on a grid), the federation's from its model card (the sites' pooled validation "
        "splits), pooled's from the same validation splits, each local-only model's from its own site's; "
        "*at 0.5*: the most probable class. AUC needs no threshold.", "",
        "| recipe | trained | t | balanced acc. at t | sensitivity at t | specificity at t | AUC "
        "| balanced acc. at 0.5 | sensitivity at 0.5 | specificity at 0.5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"federated": "federated", "pooled": "pooled", "local": "local-only"}
    columns = ("threshold", "threshold-balanced-accuracy", "threshold-sensitivity", "threshold-specificity", "auc",
               "balanced-accuracy", "sensitivity", "specificity")
    for name, kinds in r["summary"].items():
        for kind in (k for k in KINDS if k in kinds):
            stats = kinds[kind]
            cells = " | ".join(_cell(stats.get(m)) for m in columns)
            shown = f"{name} ({_seeds(kinds)} of {len(r['seeds'])} seeds)" if kind == "federated" else ""
            lines.append(f"| {shown} | {labels[kind]} | {cells} |")
    lines += ["", f"Published for comparison: {PUBLISHED}."]
    for name, why in r.get("skipped", {}).items():
        lines.append(f"- {name}: not run ({why}).")
    if r.get("unfinished"):
        lines.append(f"- not run within the pass's time limit: {', '.join(r['unfinished'])}.")
    for name, recipe in r.get("recipes", {}).items():
        if recipe.get("settings", {}).get("dp-mode") == "distributed" and name in r["summary"]:
            lines.append(f"- {name}: distributed DP (`dp-mode = distributed`, SecAgg+ with "
                         f"secagg-threshold {recipe['settings'].get('secagg-threshold')} of {SITES}, "
                         f"{recipe.get('rounds', r['rounds'])} rounds of one DP-SGD step, batch-size "
                         f"{recipe['settings'].get('batch-size')}: every site's whole training split, q = 1): each "
                         "site adds its share of the noise of the sum, sized so that every site's own ledger "
                         f"states ε <= {r['epsilon']:g} (docs/secure-aggregation.md); pooled and local-only: "
                         "central DP-SGD with the same steps, batch and ε (its momentum carries over from step to "
                         "step, where each one-step round starts a site's optimizer afresh).")
    if any(v.get("pool") for v in r.get("recipes", {}).values()):
        lines.append("- pretrained recipes: pooled and local-only start from the federation's round-1 model (the "
                     "same weights file) and train the same `trainable` blocks.")
    for stem, card in r.get("pretrained", {}).items():
        test = card.get("test") or {}
        lines.append(f"- weights `{stem}`: `fedhosp pretrain` on {card['pool-source']}, {card['epochs']} epochs "
                     f"(learning rate {card.get('settings', {}).get('learning_rate', '?')}), "
                     f"{card['seconds']:.0f} s on this machine; on the pool's own test split accuracy "
                     f"{test.get('accuracy', float('nan')):.3f}, balanced accuracy "
                     f"{test.get('balanced-accuracy', float('nan')):.3f}.")
    if r.get("best"):
        fed = r["summary"][r["best"]]["federated"]
        lines += ["", f"Best federated recipe: **{r['best']}**: balanced accuracy at its threshold "
                  f"{_cell(decided(fed, 'balanced-accuracy'))} (at 0.5: {_cell(fed.get('balanced-accuracy'))}), "
                  f"AUC {_cell(fed.get('auc'))}; the goal (balanced accuracy >= 0.70 and AUC >= 0.85) is "
                  f"{'met' if met(fed) else 'not met'}.", *ceiling_lines(r), "", recommendation(r)]
    return "\n".join(lines)


def ceiling_lines(r: dict[str, Any]) -> list[str]:
    """bench/feature_ceiling.py's bound, where the pass measured it: what the frozen features give without DP."""
    if not r.get("ceiling"):
        return []
    shown = "; ".join(f"{name}'s features ({c['features']}): AUC {c['auc']:.3f} (L2 chosen on a held-out fifth), "
                      f"{c['auc-oracle']:.3f} at the best L2 for the test split" for name, c in r["ceiling"].items())
    return ["", "Without DP, a logistic regression on the same frozen features, fit on all "
            f"{next(iter(r['ceiling'].values()))['train-images']} images the sites hold (training and validation "
            f"splits; bench/feature_ceiling.py), reaches: {shown}. A head trained under DP on fewer of them is not "
            f"expected to do better: where this is below AUC {GOAL['auc']:g}, the features, not the privacy, keep "
            "the goal out of reach."]


def recommendation(r: dict[str, Any]) -> str:
    """The recipe the docs recommend for small DP sites: the measured best's settings, as a run names them."""
    name = r["best"]
    config = next((run["config"] for run in r["runs"].get(name, {}).values() if "config" in run), None)
    if config is None:  # results from before runs recorded their settings
        return f"Recommended for small DP sites (measured above): **{name}**."
    recipe = r.get("recipes", {}).get(name, {})
    weights = (f"weights from `fedhosp pretrain` on {recipe['pool']} (`pretrained = PATH`), "
               if recipe.get("pool") else "no pretrained weights, ")
    keys = ("model", "trainable", "optimizer", "learning-rate", "momentum", "batch-size", "dp-max-grad-norm",
            "local-epochs", "rounds", *(("dp-mode", "secure-aggregation", "secagg-threshold")
                                        if config.get("dp-mode") == "distributed" else ()))
    settings = " ".join(f"{k}={config[k]}" for k in keys if k in config)
    return (f"Recommended for small DP sites (~100 images each, ε = {r['epsilon']:g}), from this table: "
            f"**{name}**: {weights}`{settings}` (the tree has no EMA setting), and decide at the federation's "
            "threshold (the model card's; `fedhosp predict` uses it), not at 0.5.")


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from passes that each ran some recipes (one recipe per invocation): their runs side by
    side, the summary and best recomputed; a recipe in several passes keeps every seed, the later pass's
    run where both have a seed."""
    if not parts:
        raise SystemExit("--merge: no results to merge")
    out: dict[str, Any] = {**parts[-1], "recipes": {}, "runs": {}, "skipped": {}, "pretrained": {},
                           "unfinished": [], "ceiling": {}}
    for part in parts:
        for key in ("recipes", "skipped", "pretrained", "ceiling"):
            out[key].update(part.get(key, {}))
        for name, per_seed in part.get("runs", {}).items():
            out["runs"].setdefault(name, {}).update(per_seed)
        out["unfinished"] += [u for u in part.get("unfinished", []) if u not in out["unfinished"]]
    for name in out["runs"]:
        out["skipped"].pop(name, None)
    done = {f"{name} seed {seed}" for name, per_seed in out["runs"].items() for seed in per_seed}
    out["unfinished"] = [u for u in out["unfinished"] if u not in done]  # a later pass ran it
    out["seeds"] = sorted({int(s) for part in parts for s in part.get("seeds", [])})
    out["date"] = max(p["date"] for p in parts)
    out["commit"] = ", ".join(dict.fromkeys(p["commit"] for p in parts))
    out["summary"] = summarize(out["runs"])
    out["best"] = best(out["summary"])
    return out


def write_doc(results: dict[str, Any], page: Path = DOC) -> Path:
    """Replace the generated block of docs/simulation.md with the table of these results."""
    return doc_block.replace(page, DOC_NAME, markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--recipes", default=",".join(r.name for r in RECIPES),
                        help=f"comma-separated recipe names (quick: {','.join(QUICK)}); '' for the ceiling alone")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"every recipe's rounds (default: its own, else {ROUNDS})")
    parser.add_argument("--stop-after-min", type=float, default=0.0,
                        help="start no new run after this many minutes (0: no limit); the rest is listed unfinished")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="runs and weights go here")
    parser.add_argument("--out", type=Path, default=None, help="the section's JSON (bench/__main__.py reads it)")
    parser.add_argument("--doc", type=Path, default=None, metavar="RESULTS",
                        help="only write docs/simulation.md's table from a bench results.json (or this JSON)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="PART",
                        help="only merge these passes' JSON (--out) into one, written to --out")
    args = parser.parse_args(argv)
    if args.merge is not None:
        if args.out is None:
            parser.error("--merge needs --out")
        merged = merge([json.loads(p.read_text()) for p in args.merge])
        args.out.write_text(json.dumps(merged, indent=1))
        print(markdown(merged))
        return 0
    if args.doc is not None:
        saved = json.loads(args.doc.read_text())
        print(f"page: {write_doc(saved['sections']['quality'] if 'sections' in saved else saved)}")
        return 0
    if not TASK_DATA.is_file():
        result: dict[str, Any] = {"skipped-all": f"{TASK_DATA} not found"}
        print(f"skipped: {TASK_DATA} not found")
        if args.out:
            args.out.write_text(json.dumps(result))
        return 0
    from bench import machine

    by_name = {r.name: r for r in RECIPES}
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}: choose from {', '.join(by_name)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    m = machine.describe()
    result = {"date": m["date"], "commit": m["commit"], "seeds": seeds, "rounds": args.rounds or ROUNDS,
              "epsilon": EPSILON, "delta": DELTA, "settings": " ".join(f"{k}={v}" for k, v in SETTINGS.items()),
              "recipes": {}, "runs": {}, "skipped": {}, "pretrained": {}, "unfinished": [], "summary": {},
              "best": None}
    started = time.monotonic()
    recipes = []
    for name in names:
        recipe = by_name[name]
        result["recipes"][name] = {"model": recipe.model, "settings": recipe.settings, "pool": recipe.pool,
                                   "trainable": recipe.trainable, "rounds": args.rounds or recipe.rounds or ROUNDS}
        why = unavailable(recipe)
        if why:
            result["skipped"][name] = why
            print(f"[quality] {name}: skipped ({why})", flush=True)
        else:
            recipes.append(recipe)
            result["runs"][name] = {}
    weights: dict[str, Path] = {}
    # Seed by seed, the CPU-heavy torchvision backbones after every seed of the rest: a pass stopped
    # early still has every light recipe at its first seeds.
    light = [r for r in recipes if r.model in LIGHT]
    order = [(seed, r) for group in (light, [r for r in recipes if r.model not in LIGHT])
             for seed in seeds for r in group]
    for seed, recipe in order:
        name = recipe.name
        if args.stop_after_min and time.monotonic() - started > 60 * args.stop_after_min:
            result["unfinished"].append(f"{name} seed {seed}")
            continue
        try:
            if recipe.pool and name not in weights:
                weights[name] = weights_for(recipe, args.work, result["pretrained"])
            rounds = args.rounds or recipe.rounds or ROUNDS
            run = run_recipe(recipe, seed, rounds, args.work, weights.get(name))
        except Exception as exc:  # one recipe's failure is a row of the table, not the end of the bench
            run = {"error": f"{type(exc).__name__}: {exc}"}
        result["runs"][name][str(seed)] = run
        print(f"[quality] {name} seed {seed}: " + (run.get("error") or ", ".join(
            f"{k} bal.acc {run[k]['threshold-balanced-accuracy']:.3f} at t={run[k]['threshold']:.3g} "
            f"({run[k]['balanced-accuracy']:.3f} at 0.5) AUC {run[k]['auc'] or float('nan'):.3f}"
            for k in KINDS if k in run)), flush=True)
        result["summary"] = summarize(result["runs"])
        result["best"] = best(result["summary"])
        if args.out:  # after every run: a long pass killed late still leaves what it finished
            args.out.write_text(json.dumps(result, indent=1))
    result["summary"] = summarize(result["runs"])
    result["best"] = best(result["summary"])
    from bench import feature_ceiling

    # every head recipe's weights this --work holds (made by this pass or an earlier one): no training here
    made = {f"{r.model}@{r.pool}": weights_file(r, args.work) for r in RECIPES if r.trainable == "head"}
    result["ceiling"] = feature_ceiling.ceilings({n: w for n, w in made.items() if w.is_file()})
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0 if all("error" not in r for per in result["runs"].values() for r in per.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
