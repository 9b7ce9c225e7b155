"""Real-data check (not a test): federated DP U-Net on the ISBI 2012 EM membranes vs one site, no DP.

Splits the 30 image/label pairs into two sites (15 each; val-fraction holds some out), writes
membrane masks (label 0 in the PNGs -> class 1) as NPY, and runs `fedhosp simulate` twice with
the same rounds and local epochs: 2 sites with DP, 2 sites without, and 1 site holding all the
data without DP.
Skips cleanly when ../shared/data is absent. Usage: python bench/isbi_check.py [OUT]
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012_membrane"
SETTINGS = "image-size=128 local-epochs=10 batch-size=8 learning-rate=0.1 val-fraction=0.3 dp-target-delta=1e-3"


def write_sites(out: Path, groups: list[list[int]]) -> None:
    for site, indices in enumerate(groups):
        folder = out / f"site-{site:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in indices:
            Image.open(SOURCE / "image" / f"{i}.png").convert("L").save(folder / f"{i}.png")
            label = np.asarray(Image.open(SOURCE / "label" / f"{i}.png").convert("L"))
            np.save(folder / f"{i}-membrane.npy", (label < 128).astype(np.uint8))
            rows.append((f"{i}.png", f"{i}-membrane.npy"))
        with open(folder / "masks.csv", "w", newline="") as f:
            csv.writer(f).writerows([("file", "mask"), *rows])


def simulate(data: Path, out: Path, sites: int, rounds: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fedhosp", "simulate", "--task", "segmentation", "--data", str(data),
           "--sites", str(sites), "--rounds", str(rounds), "--out", str(out), "--run-config", SETTINGS, *extra]
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())["final"]


def main() -> int:
    if not SOURCE.is_dir():
        print(f"skipped: {SOURCE} not found")
        return 0
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/isbi")
    write_sites(out / "two-sites", [list(range(0, 15)), list(range(15, 30))])
    write_sites(out / "one-site", [list(range(0, 15)) + list(range(15, 30))])
    rounds = 5
    federated = simulate(out / "two-sites", out / "fed-dp", 2, rounds, ["--epsilon", "8"])
    federated_plain = simulate(out / "two-sites", out / "fed-nodp", 2, rounds, ["--no-dp"])
    local = simulate(out / "one-site", out / "single-nodp", 1, rounds, ["--no-dp"])
    print(f"ISBI 2012 membranes, held-out Dice: federated 2 sites DP(eps<=8) {federated['dice']:.3f} | "
          f"federated 2 sites no DP {federated_plain['dice']:.3f} | "
          f"single site (all 30 images) no DP {local['dice']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
