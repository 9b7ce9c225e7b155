"""`fedhosp sweep`: one simulation per combination of run settings, and one table over seeds.

A study compares settings (strategy, ε, ...) over several seeds; this runs every cell of the grid
with the same simulate options (engine, cluster, data), each into `OUT/<cell>/` with its own report,
then writes `OUT/sweep.csv` (mean ± standard deviation over seeds of each final metric, per setting),
`OUT/cells.csv` (every cell: its status, error and final metrics) and `OUT/sweep.png`. A cell that
fails is a row saying why, never the end of the sweep: a study of hours should not die of one cell.
Cells run one after another in this process, so each one has the whole machine (or cluster).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import re
import shlex
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import RunConfig, key_value_pairs
from common.errors import ConfigError, FedhospError

log = logging.getLogger(__name__)
SEED = "seed"
SUMMARY_CSV, CELLS_CSV, PLOT_PNG = "sweep.csv", "cells.csv", "sweep.png"
PLOTTED = ("accuracy", "auc", "dice", "iou", "test_accuracy", "test_auc", "test_dice", "test_iou")
RunOne = Callable[[argparse.Namespace], Path]  # one simulate, given its arguments -> its results.json


@dataclass(frozen=True)
class Cell:
    settings: dict[str, str]  # grid key -> this cell's value, in grid order

    @property
    def name(self) -> str:
        """A folder name that reads as the settings: strategy-fedavg_seed-0."""
        return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", f"{k}-{v}") for k, v in self.settings.items())

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        """The settings the table compares: all but the seed, whose cells are averaged."""
        return tuple((k, v) for k, v in self.settings.items() if k != SEED)


@dataclass
class Outcome:
    cell: Cell
    ok: bool
    seconds: float
    final: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Table:
    csv: Path
    cells: Path
    png: Path
    failed: int


def parse_grid(text: str) -> dict[str, list[str]]:
    """`"strategy=fedavg,fedprox seed=0,1"` -> {"strategy": ["fedavg", "fedprox"], "seed": ["0", "1"]}.
    Keys are run settings (pyproject's [tool.flwr.app.config]); a mistyped one stops the sweep here,
    before any cell has run, while a bad value fails only its cells."""
    known = set(RunConfig().to_mapping())
    grid: dict[str, list[str]] = {}
    for key, values in key_value_pairs(text, "--grid", "KEY=VALUE[,VALUE...]"):
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise ConfigError(f"--grid entry {key}={values} is not KEY=VALUE[,VALUE...]")
        if key not in known:
            raise ConfigError(f"--grid key {key!r} is not a run setting (one of: {', '.join(sorted(known))})")
        if key in grid:
            raise ConfigError(f"--grid names {key!r} twice")
        grid[key] = choices
    if not grid:
        raise ConfigError("--grid is empty: give at least one KEY=VALUE[,VALUE...]")
    return grid


def cells(grid: dict[str, list[str]]) -> list[Cell]:
    """Every combination, the last key varying fastest (seeds of one setting side by side)."""
    return [Cell(dict(zip(grid, values, strict=True))) for values in itertools.product(*grid.values())]


def cell_args(args: argparse.Namespace, cell: Cell) -> argparse.Namespace:
    """The sweep's simulate options, with the cell's settings last in --run-config (so they win)."""
    overrides = " ".join(shlex.quote(f"{k}={v}") for k, v in cell.settings.items())
    return argparse.Namespace(**{**vars(args), "out": Path(args.out) / cell.name,
                                 "run_config": f"{args.run_config} {overrides}".strip()})


def run_cell(args: argparse.Namespace, cell: Cell, run_one: RunOne) -> Outcome:
    """One cell; any failure (a bad value, a crashed engine) is its outcome, not an exception."""
    import json

    started = time.monotonic()
    try:
        results = json.loads(Path(run_one(cell_args(args, cell))).read_text())
    except FedhospError as exc:
        return Outcome(cell, False, time.monotonic() - started, error=str(exc))
    except (Exception, SystemExit) as exc:  # whatever a cell raises, the sweep goes on
        log.debug("cell %s failed:\n%s", cell.name, traceback.format_exc())
        return Outcome(cell, False, time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")
    return Outcome(cell, True, time.monotonic() - started, final=dict(results.get("final") or {}))


def run(args: argparse.Namespace, run_one: RunOne) -> Table:
    """Every cell of args.grid, then the table; returns where it is and how many cells failed."""
    grid = parse_grid(args.grid)
    todo = cells(grid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("fedhosp sweep: %d cells (%s) into %s", len(todo), " x ".join(f"{len(v)} {k}" for k, v in grid.items()),
             out)
    outcomes = []
    for i, cell in enumerate(todo, 1):
        log.info("cell %d/%d: %s", i, len(todo), cell.name)
        outcomes.append(run_cell(args, cell, run_one))
        if not outcomes[-1].ok:
            log.warning("cell %s failed: %s", cell.name, outcomes[-1].error)
    return write(out, grid, outcomes)


def metric_keys(outcomes: list[Outcome]) -> list[str]:
    """The numeric final metrics of the cells that ran, in the report's order."""
    keys: list[str] = []
    for o in outcomes:
        keys += [k for k, v in o.final.items() if isinstance(v, (int, float)) and k not in keys]
    return keys


def summarize(grid: dict[str, list[str]], outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """One row per setting (grid values without the seed): mean and standard deviation over its seeds that
    ran (0 for a single seed), how many ran, and which failed and why."""
    keys = metric_keys(outcomes)
    groups: dict[tuple, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.cell.group, []).append(o)
    rows = []
    for group, members in groups.items():
        ran = [o for o in members if o.ok]
        row: dict[str, Any] = {**dict(group), "cells": len(members), "ok": len(ran), "failed": len(members) - len(ran)}
        for key in keys:
            values = [float(o.final[key]) for o in ran if isinstance(o.final.get(key), (int, float))]
            row[f"{key}_mean"] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        row["errors"] = "; ".join(f"{o.cell.settings.get(SEED, o.cell.name)}: {o.error}" for o in members if not o.ok)
        rows.append(row)
    return rows


def write(out: Path, grid: dict[str, list[str]], outcomes: list[Outcome]) -> Table:
    summary = summarize(grid, outcomes)
    settings = [k for k in grid if k != SEED]
    _write_csv(out / SUMMARY_CSV, summary)
    keys = metric_keys(outcomes)
    _write_csv(out / CELLS_CSV, [{**o.cell.settings, "status": "ok" if o.ok else "failed", "error": o.error,
                                  "seconds": round(o.seconds, 1), "out": o.cell.name,
                                  **{k: o.final.get(k) for k in keys}} for o in outcomes])
    plot(out / PLOT_PNG, summary, settings, [k for k in PLOTTED if k in keys][:2])
    for line in lines(summary, settings, keys):
        log.info(line)
    return Table(out / SUMMARY_CSV, out / CELLS_CSV, out / PLOT_PNG, sum(not o.ok for o in outcomes))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _label(row: dict[str, Any], settings: list[str]) -> str:
    return " ".join(f"{k}={row[k]}" for k in settings) or "all cells"


def lines(summary: list[dict[str, Any]], settings: list[str], keys: list[str]) -> list[str]:
    """The table for the console: mean ± std per setting, failures named."""
    shown = [k for k in ("accuracy", "auc", "dice", "iou", "loss", "epsilon_max") if k in keys]
    out = [f"{'setting':<40} {'ok':>5} " + " ".join(f"{k:>16}" for k in shown)]
    for row in summary:
        cells = " ".join(f"{_pm(row, k):>16}" for k in shown)
        out.append(f"{_label(row, settings)[:40]:<40} {row['ok']:>2}/{row['cells']:<2} {cells}")
        if row["failed"]:
            out.append(f"  failed: {row['errors'][:200]}")
    return out


def _pm(row: dict[str, Any], key: str) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"


def plot(path: Path, summary: list[dict[str, Any]], settings: list[str], keys: list[str]) -> None:
    """One bar per setting and metric, mean with ± std whiskers; a setting with no cell that ran says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or ["none"]
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4.0, 1.2 * len(summary)) * len(keys), 3.8), squeeze=False)
    labels = [_label(r, settings).replace(" ", "\n") for r in summary]
    for ax, key in zip(axes[0], keys, strict=True):
        means = [r.get(f"{key}_mean") for r in summary]
        ax.bar(range(len(summary)), [m or 0.0 for m in means],
               yerr=[r.get(f"{key}_std") or 0.0 for r in summary], capsize=4, color="C0")
        for x, (mean, row) in enumerate(zip(means, summary, strict=True)):
            text = "failed" if mean is None else f"{row['ok']}/{row['cells']}"
            ax.text(x, (mean or 0.0) + 0.01, text, ha="center", va="bottom", fontsize=7,
                    color="red" if row["failed"] else "black")
        ax.set_xticks(range(len(summary)), labels, fontsize=7)
        ax.set_title(f"final {key}: mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
