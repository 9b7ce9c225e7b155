"""A finished run as results.json, rounds.csv and PNGs (curves, per-site spread, privacy), beside the run log.

A simulation adds what only it knows: the source's test split scored every round
(`central.jsonl`), which node played which partition (`nodes.json`: sites are named
site-NNN, not by Flower's random node ids, so two runs with one seed write the same
results), the pooled and local-only baselines, the partition and the peak memory.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from common import decision
from common.config import site_name
from server import runlog

RESULTS = "results.json"
ROUNDS_CSV = "rounds.csv"
CURVES_PNG = "curves.png"
PRIVACY_PNG = "privacy.png"
SITES_PNG = "sites.png"
CENTRAL = "central.jsonl"  # simulation/central.py: the global model on the source's test split, per round
NODES = "nodes.json"  # simulation/grid.py: node id -> partition id
METRICS = {"classification": ("accuracy", "balanced-accuracy", "auc"), "segmentation": ("dice", "iou")}  # plotted
# tabled and in results.json's final: a majority-class collapse reads balanced accuracy 0.5, sensitivity 0 or 1
REPORTED = {"classification": ("accuracy", "balanced-accuracy", "sensitivity", "specificity", "auc"),
            "segmentation": ("dice", "iou")}
SHORT = {"accuracy": "acc", "balanced-accuracy": "bacc", "sensitivity": "sens", "specificity": "spec", "auc": "auc",
         "dice": "dice", "iou": "iou"}
SCORES = ("loss", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "auc", "dice", "iou")
# two classes: the threshold chosen on the sites' pooled validation (common/decision.py) and the scores there
AT_THRESHOLD = ("threshold", "threshold-balanced-accuracy", "threshold-sensitivity", "threshold-specificity")
LEGEND_SITES = 10  # beyond this many sites a legend hides the plot
SHOWN_ROUNDS = 12  # sites.png: boxes for at most this many rounds
COLUMNS = ("round", "loss", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "auc", "dice", "iou",
           *AT_THRESHOLD, "test_loss", "test_accuracy", "test_balanced-accuracy", "test_sensitivity",
           "test_specificity", "test_auc", "test_dice", "test_iou", *(f"test_{k}" for k in AT_THRESHOLD[1:]),
           "site_worst", "site_median", "epsilon_max", "epsilon_total_max", "client_epsilon",
           "train_loss", "sites_ok", "sites_failed", "sites_refused", "sites_rejected", "rejected", "seconds")


def round_row(record: dict[str, Any], test: dict[str, Any] | None = None, primary: str = "accuracy") -> dict[str, Any]:
    """One round; `test` is the global model on the source's test split, when it has one."""
    ev, tr = record["evaluate"], record["train"]
    spread = sorted(float(s[primary]) for s in record.get("site_scores", []) if primary in s)
    return {
        "round": record["round"],
        "loss": ev.get("loss"),
        **{key: ev[key] for key in (*SCORES[1:], *AT_THRESHOLD) if key in ev},
        **{f"test_{key}": test[key] for key in SCORES if test and key in test},
        **_test_at_threshold(test, ev.get("threshold")),
        "site_worst": spread[0] if spread else None,
        "site_median": float(np.median(spread)) if spread else None,
        "epsilon_max": tr.get("epsilon-max"),
        "epsilon_total_max": tr.get("epsilon-total-max"),
        "client_epsilon": tr.get("client-epsilon"),
        "train_loss": tr.get("train-loss"),
        "sites_ok": record["sites_ok"],
        "sites_failed": record["sites_failed"],
        "sites_refused": record.get("sites_refused", 0),
        "sites_rejected": record.get("sites_rejected", 0),
        "rejected": " ".join(f"{r.get('phase', 'train')}:{r.get('class', '')}" for r in record.get("rejected", [])),
        "seconds": record["seconds"],
    }


def _test_at_threshold(test: dict[str, Any] | None, threshold: float | None) -> dict[str, Any]:
    """The test split at the threshold chosen on the sites' validation that round: the honest figure
    (the validation's own score at its best threshold is optimistic)."""
    if not test or threshold is None or decision.tp_key(threshold) not in test.get("counts", {}):
        return {}
    scores = decision.at(test["counts"], threshold)
    return {f"test_threshold-{k}": v for k, v in scores.items()}


def privacy_by_site(records: list[dict[str, Any]], names: dict[int, str] | None = None) -> dict[str, Any]:
    """ε of each site after each round it trained, and every refusal: who, when, how much was spent."""
    per_site: dict[str, list[dict[str, Any]]] = {}
    refused = []
    for record in records:
        for site in record.get("sites", []):
            name, entry = _named(site, names)
            per_site.setdefault(name, []).append({"round": record["round"], **entry})
        refused += [{"round": record["round"], **_named(r, names)[1]} for r in record.get("refused", [])]
    return {"per-site": dict(sorted(per_site.items())), "refused": refused}


def rejections(records: list[dict[str, Any]], names: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Every rejected reply: round, site, phase (train / evaluate), reason class and reason."""
    return [{"round": record["round"], **_named(r, names)[1]} for record in records for r in record.get("rejected", [])]


def scores_by_site(records: list[dict[str, Any]], names: dict[int, str] | None = None) -> dict[str, Any]:
    """Each site's held-out metrics for the global model (and a personalized one), per round."""
    per_site: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        for site in record.get("site_scores", []):
            name, entry = _named(site, names)
            per_site.setdefault(name, []).append({"round": record["round"], **entry})
    return dict(sorted(per_site.items()))


def _named(entry: dict[str, Any], names: dict[int, str] | None) -> tuple[str, dict[str, Any]]:
    """A simulation's site by its partition name (reproducible); otherwise by node id."""
    node = entry.get("node")
    if names and node in names:
        return names[node], {"site": names[node], **{k: v for k, v in entry.items() if k != "node"}}
    return str(node), dict(entry)


def site_names(out_dir: Path) -> dict[int, str]:
    path = Path(out_dir) / NODES
    if not path.is_file():
        return {}
    return {int(node): site_name(int(pid)) for node, pid in json.loads(path.read_text()).items()}


def central_rounds(out_dir: Path) -> dict[int, dict[str, Any]]:
    path = Path(out_dir) / CENTRAL
    if not path.is_file():
        return {}
    return {r["round"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def write(out_dir: Path, config: dict[str, Any], sites: int, extra: dict[str, Any] | None = None) -> Path:
    """Build the report from the run log the ServerApp wrote; return the results.json path."""
    out_dir = Path(out_dir)
    records = runlog.read(out_dir / runlog.RUN_LOG)
    shown = METRICS[config.get("task", "classification")]
    tests = central_rounds(out_dir)
    rows = [round_row(r, tests.get(r["round"]), shown[0]) for r in records]
    last = rows[-1] if rows else {}
    events = runlog.events(out_dir / runlog.RUN_LOG)
    stops = [e for e in events if e["event"] == "stopped"]
    grids = [e["layers"] for e in events if e["event"] == "grid"]
    names = site_names(out_dir)
    privacy = privacy_by_site(records + [s for s in stops if s.get("refused")], names)
    per_site = scores_by_site(records, names)
    reported = REPORTED[config.get("task", "classification")]
    final_keys = ("loss", *reported, *AT_THRESHOLD, *(f"test_{k}" for k in ("loss", *reported, *AT_THRESHOLD[1:])),
                  "site_worst", "site_median", "epsilon_max")
    results = {
        "config": config,
        "sites": sites,
        "rounds": rows,
        "final": {k: last.get(k) for k in final_keys if k in last},
        "site-scores": per_site,
        "privacy": privacy,
        "rejected": rejections(records, names),  # server/validation.py: replies left out, with their class
        "stopped": stops[-1]["reason"] if stops else None,
        "grid": grids[-1] if grids else None,  # the ServerApp's grid stack, top first (server/assembly.py)
        "model": "model.pt",
        **(extra or {}),
    }
    path = out_dir / RESULTS
    path.write_text(json.dumps(results, indent=2))
    with open(out_dir / ROUNDS_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        target = config.get("dp-target-epsilon") if config.get("dp-enabled") else None
        plot_curves(rows, out_dir / CURVES_PNG, shown, target, results.get("baselines"))
    if per_site:
        plot_sites(per_site, out_dir / SITES_PNG, shown[0], results.get("baselines"))
    if privacy["per-site"] and any("epsilon" in p for v in privacy["per-site"].values() for p in v):
        plot_privacy(privacy, out_dir / PRIVACY_PNG, config.get("dp-target-epsilon"),
                     config.get("site-privacy-budget") or None)
    return path


def plot_curves(rows: list[dict[str, Any]], path: Path, shown: tuple[str, ...], target_epsilon: float | None,
                baselines: dict[str, Any] | None = None) -> None:
    """Global metrics per round: on the sites' validation splits (solid), on the source's test
    split (dashed) where it has one, and the pooled / local-only baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in rows]
    titles = {"accuracy": "held-out accuracy", "balanced-accuracy": "held-out balanced accuracy",
              "auc": "held-out AUC", "dice": "held-out Dice", "iou": "held-out IoU"}
    panels = [(key, titles[key]) for key in shown] + [("loss", "held-out loss")]
    if target_epsilon is not None:
        panels.append(("epsilon_max", "ε spent (max over sites)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    has_test = any(r.get(f"test_{shown[0]}") is not None for r in rows)
    for ax, (key, title) in zip(axes, panels, strict=True):
        label = ("federated, sites' val" if has_test else "federated") if key in SCORES else None
        ax.plot(rounds, [r.get(key) for r in rows], marker="o", label=label)
        if key in SCORES and has_test:
            ax.plot(rounds, [r.get(f"test_{key}") for r in rows], marker="s", linestyle="--", color="C0",
                    label="federated, test split")
        if key in SCORES and baselines:
            for name, color, style in (("pooled", "C2", "-."), ("local", "C3", ":")):
                where = "test" if has_test and baselines[name].get("test") else "sites"
                value = (baselines[name].get(where) or {}).get(key)
                if value is not None:
                    label = {"pooled": "pooled", "local": "local-only (mean)"}[name]
                    ax.axhline(value, color=color, linestyle=style,
                               label=f"{label}, {'test split' if where == 'test' else 'sites' + chr(39) + ' val'}")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key in SCORES and (has_test or baselines) and key == shown[0]:
            ax.legend(fontsize=7)
    if target_epsilon is not None:
        axes[-1].axhline(target_epsilon, color="red", linestyle="--", label=f"target ε = {target_epsilon:g}")
        axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_privacy(privacy: dict[str, Any], path: Path, target: float | None, budget: float | None) -> None:
    """ε per site per round: this run's (solid) and over every run on the site's data (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (node, points) in enumerate(sorted(privacy["per-site"].items())):
        color = f"C{i % 10}"
        rounds = [p["round"] for p in points if "epsilon" in p]
        ax.plot(rounds, [p["epsilon"] for p in points if "epsilon" in p], marker="o", color=color,
                label=(node if node.startswith("site-") else f"site {node[-6:]}") if i < LEGEND_SITES else None)
        if any("epsilon-total" in p for p in points):
            ax.plot(rounds, [p.get("epsilon-total") for p in points if "epsilon" in p], linestyle=":", color=color)
    for r in privacy["refused"]:
        ax.plot(r["round"], r.get("epsilon-total", 0.0), marker="x", color="black", markersize=9)
    if target:
        ax.axhline(target, color="red", linestyle="--", label=f"run target ε = {target:g}")
    if budget:
        ax.axhline(budget, color="black", linestyle="-.", label=f"site budget = {budget:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("ε")
    ax.set_title("ε per site (dotted: all runs; x: refused)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sites(per_site: dict[str, list[dict[str, Any]]], path: Path, metric: str,
               baselines: dict[str, Any] | None = None) -> None:
    """The spread over sites of the global model's `metric` per round (the worst site in red),
    beside the same spread for pooled and local-only models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted({p["round"] for points in per_site.values() for p in points})
    if len(rounds) > SHOWN_ROUNDS:  # evenly spaced, always the first and the last
        rounds = sorted({rounds[round(i * (len(rounds) - 1) / (SHOWN_ROUNDS - 1))] for i in range(SHOWN_ROUNDS)})
    spreads = [[p[metric] for points in per_site.values() for p in points if p["round"] == r and metric in p]
               for r in rounds]
    labels = [str(r) for r in rounds]
    for name in ("pooled", "local"):
        if baselines and baselines.get(name):
            spreads.append([s[metric] for s in baselines[name]["per-site"] if metric in s])
            labels.append({"pooled": "pooled", "local": "local-only"}[name])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) + 2), 3.6))
    ax.boxplot(spreads, tick_labels=labels, showmeans=True)
    worst = [min(v) if v else float("nan") for v in spreads]
    ax.plot(range(1, len(rounds) + 1), worst[:len(rounds)], color="red", marker="v", label="worst site")
    for i in range(len(rounds), len(labels)):
        ax.plot(i + 1, worst[i], color="red", marker="v")
    ax.set_xlabel("round (global model on each site's validation split) | baselines")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per site ({len(per_site)} sites)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(results: dict[str, Any]) -> list[str]:
    """Federated vs pooled vs local-only, on the test split and on the sites' validation splits: accuracy
    beside balanced accuracy, sensitivity, specificity and AUC (at 0.5), so a collapse shows."""
    shown = REPORTED[results["config"].get("task", "classification")]
    final, base = results["final"], results.get("baselines") or {}
    has_test = any(final.get(f"test_{k}") is not None for k in shown)
    width = 10
    head = f"{'':<22}" + "".join(f"{'test ' + SHORT[k]:>{width}}" for k in shown if has_test) + \
        "".join(f"{'sites ' + SHORT[k]:>{width + 1}}" for k in shown) + f"{'worst site':>12}{'ε':>8}"
    lines = [head]

    def cell(value: Any, w: int = width) -> str:
        return f"{value:>{w}.3f}" if isinstance(value, int | float) else f"{'-':>{w}}"

    fed_worst = final.get("site_worst")
    eps = final.get("epsilon_max")
    lines.append(f"{'federated (' + results['config'].get('strategy', 'fedavg') + ')':<22}"
                 + "".join(cell(final.get(f"test_{k}")) for k in shown if has_test)
                 + "".join(cell(final.get(k), width + 1) for k in shown) + cell(fed_worst, 12) + cell(eps, 8))
    for name, label in (("pooled", "pooled (centralized)"), ("local", "local-only (mean)")):
        b = base.get(name)
        if not b:
            continue
        worst = min((s[shown[0]] for s in b["per-site"] if shown[0] in s), default=None)
        lines.append(f"{label:<22}"
                     + "".join(cell((b.get("test") or {}).get(k)) for k in shown if has_test)
                     + "".join(cell(b["sites"].get(k), width + 1) for k in shown) + cell(worst, 12)
                     + cell(b.get("epsilon", b.get("epsilon-max")), 8))
    if final.get("threshold") is not None:
        at = [f"{SHORT[k]} {final[f'threshold-{k}']:.3f}" for k in ("balanced-accuracy", "sensitivity",
                                                                    "specificity") if f"threshold-{k}" in final]
        test = [f"{SHORT[k]} {final[f'test_threshold-{k}']:.3f}" for k in ("balanced-accuracy", "sensitivity",
                                                                           "specificity")
                if f"test_threshold-{k}" in final]
        lines.append(f"federated at threshold {final['threshold']:.3g} (chosen on the sites' pooled validation): "
                     f"sites {', '.join(at)}" + (f"; test {', '.join(test)}" if test else ""))
    return lines


def summary_lines(results_path: Path) -> list[str]:
    """What the CLI prints at the end: the comparison table, the final line, time and peak memory."""
    results = json.loads(Path(results_path).read_text())
    lines = []
    if results.get("partition"):
        p = results["partition"]
        lines.append(f"sites: {p['scheme']} over {p['source']}; sizes {min(p['sizes'])}..{max(p['sizes'])}, "
                     f"label skew {p['label-skew']:.2f}")
    if results.get("baselines") or results["final"].get("site_worst") is not None:
        lines += summary_table(results)
    lines.append(final_line(results_path))
    if results.get("memory"):
        m = results["memory"]
        lines.append(f"wall {results.get('seconds', 0):.0f}s | peak memory of the process tree: RSS "
                     f"{m['peak-rss-mb']:.0f} MB (PSS {m['peak-pss-mb']:.0f} MB) over {m['peak-processes']} processes")
    return lines


def final_line(results_path: Path) -> str:
    results = json.loads(Path(results_path).read_text())
    final = results["final"]
    parts = ["final:"] + [f"{key} {value:.3f}" for key, value in final.items()
                          if not key.endswith("loss") and key not in ("epsilon_max", "site_median")
                          and value is not None]
    if final.get("epsilon_max") is not None:
        parts.append(f"eps_max {final['epsilon_max']:.2f}")
    refused = results.get("privacy", {}).get("refused", [])
    if refused:
        parts.append(f"{len(refused)} site-round(s) refused: privacy budget spent")
    return parts[0] + " " + " | ".join(parts[1:])
