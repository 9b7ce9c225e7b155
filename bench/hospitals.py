"""Synthetic hospitals for the benchmarks: written once, decode caches warm, shared by every engine.

Each benchmark compares engines on the same sites and data, so the folders (and the sites'
decode caches, kept in their state folders) are made before any clock starts: writing
DICOM files and decoding them is measured by bench/decoding.py, not counted as engine time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import RunConfig
from server import runlog
from simulation import site_secrets
from simulation.run import SimulationOptions, preflight, prepare_hospitals


def ready(root: Path, name: str, sites: int, images_per_site: int, written: int | None = None,
          **settings: Any) -> RunConfig:
    """Run `name`'s config (the run defaults, `settings` in kebab-case on top) over the first `sites` of the
    `written` (default: `sites`) synthetic hospitals under `root`, written once and shared by every run. The run
    gets its own site state folders, decode caches filled: a site's ledger holds every run on its data, and ε
    over it costs more with every entry, so runs sharing state would slow each other down."""
    cfg = RunConfig.from_mapping({
        "data-root": str(root / "hospitals"), "state-root": str(root / "state" / name),
        "out-dir": str(root / "runs" / name), "min-available-sites": sites, **settings,
    })
    prepare_hospitals(cfg, SimulationOptions(written or sites, images_per_site=images_per_site))
    preflight(cfg, sites)
    if cfg.dp_enabled:  # DP noise from the seed, as in `fedhosp simulate`: runs that differ in one setting pair up
        site_secrets.write(cfg, sites)
    return cfg


def round_seconds(out_dir: Path | str) -> list[float]:
    """Each finished round's wall time, as the ServerApp measured it (train + evaluate)."""
    return [float(r["seconds"]) for r in runlog.read(Path(out_dir) / runlog.RUN_LOG)]


def final_metrics(out_dir: Path | str) -> dict[str, Any]:
    records = runlog.read(Path(out_dir) / runlog.RUN_LOG)
    return dict(records[-1]["evaluate"]) if records else {}

