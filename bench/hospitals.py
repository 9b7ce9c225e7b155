"""Synthetic hospitals for the benchmarks: written once, decode caches warm, shared by every engine.

Each benchmark compares engines on the same sites and data, so the folders (and the sites'
decode caches, kept in their state folders) are made before any clock starts: writing
DICOM files and decoding them is measured by bench/decode.py, not counted as engine time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import RunConfig
from server import runlog
from simulation.run import SimulationOptions, preflight, prepare_hospitals


def run_config(root: Path, name: str, sites: int, **settings: Any) -> RunConfig:
    """The run's defaults (pyproject) over `sites` sites under `root`, with `settings` (kebab-case) on top."""
    return RunConfig.from_mapping({
        "data-root": str(root / "hospitals"), "state-root": str(root / "sites"), "out-dir": str(root / "runs" / name),
        "min-available-sites": sites, **settings,
    })


def prepare(cfg: RunConfig, sites: int, images_per_site: int) -> None:
    """Write the synthetic hospitals (unless there already) and fill every site's decode cache."""
    prepare_hospitals(cfg, SimulationOptions(sites, images_per_site=images_per_site))
    preflight(cfg, sites)


def round_seconds(out_dir: Path | str) -> list[float]:
    """Each finished round's wall time, as the ServerApp measured it (train + evaluate)."""
    return [float(r["seconds"]) for r in runlog.read(Path(out_dir) / runlog.RUN_LOG)]


def final_metrics(out_dir: Path | str) -> dict[str, Any]:
    records = runlog.read(Path(out_dir) / runlog.RUN_LOG)
    return dict(records[-1]["evaluate"]) if records else {}

