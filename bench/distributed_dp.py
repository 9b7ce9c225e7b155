"""Local vs distributed DP on BreastMNIST (issue 22, phase 2): the same model, the same privacy per site.

BreastMNIST over 5 sites by Dirichlet(0.5), δ = 1e-5, seeds 0-2, scored on the official test split by
bench/quality.py's own functions (imported, not copied): balanced accuracy and AUC, mean ± spread.
- local: today's DP-SGD at every site, ε = 8 per site (plain round loop; under SecAgg+ the same model
  within one quantization level), quality.py's best local-DP recipe: scatter-linear, learning-rate 0.2,
  batch 32, one local epoch, 30 rounds.
- distributed: `dp-mode = distributed` under SecAgg+ (threshold 3 of 5): each round one DP-SGD step
  of the pooled sampled batch, its noise split over the sites. The coordinator picks the sum's noise
  multiplier sigma so that the site with the largest sampling rate q_k = 1/ceil(n_k / batch) spends ε = 8
  over the rounds (common/privacy.py noise_multiplier); every site's own ledger then states ε <= 8.

Usage: python -m bench.distributed_dp [--seeds 0,1,2] [--kinds local,distributed] [--rounds 100]
       [--learning-rate 0.25] [--batch-size 32] [--work runs/distributed-dp] [--out bench/results-distributed-dp.json]
Each (kind, seed) is one piece (a few minutes); results are merged into --out, so pieces can run apart.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench import doc_block, quality

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results-distributed-dp.json"
DOC, DOC_NAME = ROOT / "docs" / "secure-aggregation.md", "bench/distributed_dp.py"  # its generated block
MODEL = "scatter-linear"
LOCAL = {"learning-rate": 0.2}  # bench/quality.py's RECIPES: its best local-DP learning rate for this model
THRESHOLD = 3  # of 5: above half the sites, as docs/secure-aggregation.md asks
METRICS = ("balanced-accuracy", "auc", "sensitivity", "specificity", "accuracy")


def train_sizes(args) -> list[int]:
    """Each site's training split, written as the simulation will write (and then reuse) it."""
    from client.site import site_from_context
    from fedhosp import cli
    from simulation import pool, virtual_sites

    cfg = cli.simulate_config(args)
    data = pool.load(quality.TASK_DATA, cfg.image_size, Path(cfg.out_dir) / "pool-cache")
    virtual_sites.write(data, Path(cfg.data_root), quality.SITES,
                        virtual_sites.PartitionOptions("dirichlet", quality.ALPHA), cfg.seed)
    return [len(site_from_context(cfg, {"partition-id": p}).data()[0]) for p in range(quality.SITES)]


def sum_noise_multiplier(sizes: list[int], batch_size: int, rounds: int, rate: str = "max") -> tuple[float, float]:
    """(sigma, the q it is sized for): the noise of the sum that spends ε over `rounds` one-step rounds at the
    largest q_k (`max`: every site trains every round), or at the median one (`median`: a site with a larger
    q_k reaches ε sooner and then refuses, as its ledger's check of the run's target makes it)."""
    from common import privacy

    rates = [1.0 / math.ceil(n / batch_size) for n in sizes]
    q = max(rates) if rate == "max" else statistics.median(rates)
    return privacy.noise_multiplier(quality.EPSILON, quality.DELTA, q, rounds), q


def calibrate(settings: dict[str, Any], seed: int, rounds: int, out: Path, rate: str = "max") -> dict[str, Any]:
    """The noise multiplier of the sum for this seed's partition (the sites' training splits) and settings."""
    sizes = train_sizes(quality.simulate_args(seed, rounds, out, {**settings, "dp-noise-multiplier": 1.0}))
    sigma, q = sum_noise_multiplier(sizes, int(settings["batch-size"]), rounds, rate)
    return {"sigma": sigma, "sigma-for-q": q, "sigma-for": rate, "train-sizes": sizes}


def run(kind: str, seed: int, rounds: int, lr: float, batch_size: int, work: Path,
        rate: str = "max") -> dict[str, Any]:
    """One simulation and its scores on the test split."""
    from fedhosp import cli
    from server import runlog

    settings: dict[str, Any] = {**quality.SETTINGS, "model": MODEL, **LOCAL}
    extra: dict[str, Any] = {}
    if kind == "distributed":
        settings.update({"batch-size": batch_size, "learning-rate": lr, "dp-mode": "distributed",
                         "secure-aggregation": "secaggplus", "secagg-threshold": THRESHOLD})
    out = work / kind / f"seed-{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the sites' ledgers of an earlier one would count
    if kind == "distributed":
        extra = {**calibrate(settings, seed, rounds, out, rate), "secagg-threshold": THRESHOLD}
        settings["dp-noise-multiplier"] = extra["sigma"]
    args = quality.simulate_args(seed, rounds, out, settings)
    started = time.monotonic()
    results = json.loads(cli.run_simulate(args).read_text())
    cfg = cli.simulate_config(args)
    report = _score(cfg, out)
    log = [r for r in runlog.read(out / runlog.RUN_LOG) if "round" in r]
    failed = [r["round"] for r in log if r.get("failed")]
    refused = sum(len(r.get("refused") or []) for r in log)
    return {**report, **extra, "epsilon-max": results["final"].get("epsilon_max"), "rounds": rounds,
            "learning-rate": float(settings["learning-rate"]), "batch-size": int(settings["batch-size"]),
            "failed-rounds": failed, "refusals": refused,
            "clipped-coordinates": _clipped(cfg) if kind == "distributed" else None,
            "seconds": round(time.monotonic() - started, 1)}


def _score(cfg, out: Path) -> dict[str, Any]:
    """bench/quality.py's scoring of the final model, at its model card's threshold and at 0.5."""
    model, threshold = quality._final_model(cfg, out)
    return quality._report(model, quality._test_set(cfg, out), threshold)


def _clipped(cfg) -> int:
    """Update coordinates the SecAgg+ quantizer clipped at ±secagg-clipping-range, over every site and round
    (each site's audit log): they should be none, the clip is not part of the accounted mechanism."""
    from client import audit

    return sum(int(line.get("secagg-clipped", 0)) for p in range(quality.SITES)
               for line in audit.read(cfg.site_state_dir(p)) if line.get("event") == "train")


def summarize(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per kind: each metric's mean and spread (sample standard deviation) over the seeds."""
    out: dict[str, dict[str, Any]] = {}
    for kind, per_seed in runs.items():
        out[kind] = {}
        for metric in (*METRICS, "epsilon-max"):
            values = [r[metric] for r in per_seed.values() if r.get(metric) is not None]
            if values:
                out[kind][metric] = {"mean": statistics.fmean(values), "seeds": len(values),
                                     "spread": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| DP | balanced accuracy | AUC | sensitivity | specificity | max site ε | seeds |",
             "|---|---|---|---|---|---|---|"]
    for kind, stats in summary.items():
        cells = [f"{stats[m]['mean']:.3f} ± {stats[m]['spread']:.3f}" if m in stats else "" for m in
                 ("balanced-accuracy", "auc", "sensitivity", "specificity")]
        eps = f"{stats['epsilon-max']['mean']:.2f}" if "epsilon-max" in stats else ""
        lines.append(f"| {kind} | {' | '.join(cells)} | {eps} | {stats.get('auc', {}).get('seeds', 0)} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """docs/secure-aggregation.md's block: the table, and the noise each seed's distributed run was given."""
    lines = [f"*Generated by `python -m bench.distributed_dp --doc` from {OUT.name}; do not edit by hand.*", "",
             table(results["summary"])]
    for kind, per_seed in results["runs"].items():
        sized = {seed: r for seed, r in per_seed.items() if "sigma" in r}
        if sized:
            lines += ["", f"- {kind}: sigma, the noise multiplier of the sum, per seed: " + "; ".join(
                f"seed {seed}: {r['sigma']:.2f} for q = {r['sigma-for-q']:g} (smallest site "
                f"{min(r['train-sizes'])} training images, batch {r['batch-size']}, {r['rounds']} rounds)"
                for seed, r in sized.items()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--kinds", default="local,distributed")
    parser.add_argument("--rounds", type=int, default=100, help="distributed rounds (one step each)")
    parser.add_argument("--local-rounds", type=int, default=quality.ROUNDS)
    parser.add_argument("--learning-rate", type=float, default=0.25, help="distributed learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="distributed: the expected batch per site")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "distributed-dp")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--sigma-for", choices=("max", "median"), default="max",
                        help="size sigma for the largest q_k (every site every round) or the median one")
    parser.add_argument("--tag", default="", help="store the runs under KIND@TAG (tuning), not KIND")
    parser.add_argument("--doc", type=Path, default=None, metavar="RESULTS",
                        help=f"only write {DOC.relative_to(ROOT)}'s table from these results")
    args = parser.parse_args(argv)
    if args.doc is not None:
        results = json.loads(args.doc.read_text())
        print(f"page: {doc_block.replace(DOC, DOC_NAME, markdown(results))}")
        return results
    import torch

    torch.set_num_threads(1)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    for kind in args.kinds.split(","):
        name = f"{kind}@{args.tag}" if args.tag else kind
        for seed in (int(s) for s in args.seeds.split(",")):
            rounds = args.rounds if kind == "distributed" else args.local_rounds
            work = args.work / args.tag if args.tag else args.work
            r = run(kind, seed, rounds, args.learning_rate, args.batch_size, work, args.sigma_for)
            results["runs"].setdefault(name, {})[str(seed)] = r
            print(json.dumps({"kind": name, "seed": seed, **r}), flush=True)
            results["summary"] = summarize(results["runs"])
            args.out.write_text(json.dumps(results, indent=1))
    print(table(results["summary"]))
    return results


if __name__ == "__main__":
    main()
