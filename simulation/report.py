"""A finished run as results.json, rounds.csv and a PNG of the curves, beside the run log."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from server import runlog

RESULTS = "results.json"
ROUNDS_CSV = "rounds.csv"
CURVES_PNG = "curves.png"
METRICS = {"classification": ("accuracy", "auc"), "segmentation": ("dice", "iou")}
COLUMNS = ("round", "loss", "accuracy", "auc", "dice", "iou", "epsilon_max", "train_loss", "sites_ok",
           "sites_failed", "seconds")


def round_row(record: dict[str, Any]) -> dict[str, Any]:
    ev, tr = record["evaluate"], record["train"]
    return {
        "round": record["round"],
        "loss": ev.get("loss"),
        **{key: ev[key] for key in ("accuracy", "auc", "dice", "iou") if key in ev},
        "epsilon_max": tr.get("epsilon-max"),
        "train_loss": tr.get("train-loss"),
        "sites_ok": record["sites_ok"],
        "sites_failed": record["sites_failed"],
        "seconds": record["seconds"],
    }


def write(out_dir: Path, config: dict[str, Any], sites: int, extra: dict[str, Any] | None = None) -> Path:
    """Build the report from the run log the ServerApp wrote; return the results.json path."""
    out_dir = Path(out_dir)
    rows = [round_row(r) for r in runlog.read(out_dir / runlog.RUN_LOG)]
    last = rows[-1] if rows else {}
    shown = METRICS[config.get("task", "classification")]
    results = {
        "config": config,
        "sites": sites,
        "rounds": rows,
        "final": {k: last.get(k) for k in ("loss", *shown, "epsilon_max")},
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


def final_line(results_path: Path) -> str:
    final = json.loads(Path(results_path).read_text())["final"]
    parts = ["final:"] + [f"{key} {value:.3f}" for key, value in final.items()
                          if key not in ("loss", "epsilon_max") and value is not None]
    if final.get("epsilon_max") is not None:
        parts.append(f"eps_max {final['epsilon_max']:.2f}")
    return parts[0] + " " + " | ".join(parts[1:])
