"""A finished run as results.json, rounds.csv and PNGs (curves, privacy per site), beside the run log."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from server import runlog

RESULTS = "results.json"
ROUNDS_CSV = "rounds.csv"
CURVES_PNG = "curves.png"
PRIVACY_PNG = "privacy.png"
METRICS = {"classification": ("accuracy", "auc"), "segmentation": ("dice", "iou")}
COLUMNS = ("round", "loss", "accuracy", "auc", "dice", "iou", "epsilon_max", "epsilon_total_max", "client_epsilon",
           "train_loss", "sites_ok", "sites_failed", "sites_refused", "seconds")


def round_row(record: dict[str, Any]) -> dict[str, Any]:
    ev, tr = record["evaluate"], record["train"]
    return {
        "round": record["round"],
        "loss": ev.get("loss"),
        **{key: ev[key] for key in ("accuracy", "auc", "dice", "iou") if key in ev},
        "epsilon_max": tr.get("epsilon-max"),
        "epsilon_total_max": tr.get("epsilon-total-max"),
        "client_epsilon": tr.get("client-epsilon"),
        "train_loss": tr.get("train-loss"),
        "sites_ok": record["sites_ok"],
        "sites_failed": record["sites_failed"],
        "sites_refused": record.get("sites_refused", 0),
        "seconds": record["seconds"],
    }


def privacy_by_site(records: list[dict[str, Any]]) -> dict[str, Any]:
    """ε of each site after each round it trained, and every refusal: who, when, how much was spent."""
    per_site: dict[str, list[dict[str, Any]]] = {}
    refused = []
    for record in records:
        for site in record.get("sites", []):
            per_site.setdefault(str(site["node"]), []).append({"round": record["round"], **site})
        refused += [{"round": record["round"], **r} for r in record.get("refused", [])]
    return {"per-site": per_site, "refused": refused}


def write(out_dir: Path, config: dict[str, Any], sites: int, extra: dict[str, Any] | None = None) -> Path:
    """Build the report from the run log the ServerApp wrote; return the results.json path."""
    out_dir = Path(out_dir)
    records = runlog.read(out_dir / runlog.RUN_LOG)
    rows = [round_row(r) for r in records]
    last = rows[-1] if rows else {}
    stops = runlog.events(out_dir / runlog.RUN_LOG)
    privacy = privacy_by_site(records + [s for s in stops if s.get("refused")])
    shown = METRICS[config.get("task", "classification")]
    results = {
        "config": config,
        "sites": sites,
        "rounds": rows,
        "final": {k: last.get(k) for k in ("loss", *shown, "epsilon_max")},
        "privacy": privacy,
        "stopped": stops[-1]["reason"] if stops else None,
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
        plot_curves(rows, out_dir / CURVES_PNG, shown, target)
    if privacy["per-site"] and any("epsilon" in p for v in privacy["per-site"].values() for p in v):
        plot_privacy(privacy, out_dir / PRIVACY_PNG, config.get("dp-target-epsilon"),
                     config.get("site-privacy-budget") or None)
    return path


def plot_curves(rows: list[dict[str, Any]], path: Path, shown: tuple[str, ...], target_epsilon: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    titles = {"accuracy": "held-out accuracy", "auc": "held-out AUC", "dice": "held-out Dice", "iou": "held-out IoU"}
    panels = [(key, titles[key]) for key in shown] + [("loss", "held-out loss")]
    if target_epsilon is not None:
        panels.append(("epsilon_max", "ε spent (max over sites)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot(rounds, [r[key] for r in rows], marker="o")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
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
                label=f"site {node[-6:]}")
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


def final_line(results_path: Path) -> str:
    results = json.loads(Path(results_path).read_text())
    final = results["final"]
    parts = ["final:"] + [f"{key} {value:.3f}" for key, value in final.items()
                          if key not in ("loss", "epsilon_max") and value is not None]
    if final.get("epsilon_max") is not None:
        parts.append(f"eps_max {final['epsilon_max']:.2f}")
    refused = results.get("privacy", {}).get("refused", [])
    if refused:
        parts.append(f"{len(refused)} site-round(s) refused: privacy budget spent")
    return parts[0] + " " + " | ".join(parts[1:])
