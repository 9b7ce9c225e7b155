"""Real-data check (not a test): federated DP U-Net on the ISBI 2012 EM membranes vs one site, no DP.

Splits the 30 image/label pairs into two sites (15 each; val-fraction holds some out), writes
membrane masks (label 0 in the PNGs -> class 1) as NPY, and runs `fedhosp simulate` twice with
the same rounds and local epochs: 2 sites with DP, 2 sites without, and 1 site holding all the
data without DP.
`--model unet-resnet18 --pretrained PATH`: the U-Net with a ResNet encoder, started from a classifier's
weights file (`fedhosp pretrain` on a public pool; its `fc` is dropped, the decoder starts fresh:
common/models/pretrained.py); `--runs` picks which of the three to run, `--json` writes the Dice figures.
Skips cleanly when ../shared/data is absent.
Usage: python bench/isbi_check.py [OUT] [--model M] [--pretrained PATH] [--trainable T] [--runs fed-dp,...]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
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


def simulate(data: Path, out: Path, sites: int, rounds: int, extra: list[str], settings: str = SETTINGS) -> dict:
    cmd = [sys.executable, "-m", "fedhosp", "simulate", "--task", "segmentation", "--data", str(data),
           "--sites", str(sites), "--rounds", str(rounds), "--out", str(out), "--run-config", settings, *extra]
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())["final"]


# name -> (sites folder, sites, simulate's privacy flags), as today's three runs
RUNS = {"fed-dp": ("two-sites", 2, ["--epsilon", "8"]), "fed-nodp": ("two-sites", 2, ["--no-dp"]),
        "single-nodp": ("one-site", 1, ["--no-dp"])}
SHOWN = {"fed-dp": "federated 2 sites DP(eps<=8)", "fed-nodp": "federated 2 sites no DP",
         "single-nodp": "single site (all 30 images) no DP"}


def settings_for(args: argparse.Namespace) -> str:
    """Today's settings, with the model (and its round-1 weights and trainable blocks) the run names."""
    extra = [f"model={args.model}"] if args.model else []
    if args.pretrained:
        extra.append(f"pretrained={Path(args.pretrained).resolve()}")
    if args.trainable:
        extra.append(f"trainable={args.trainable}")
    return " ".join([SETTINGS, *extra, *args.set])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("runs/isbi"))
    parser.add_argument("--model", default="", help="a segmentation model of the registry (default: the task's)")
    parser.add_argument("--pretrained", default="", help="round-1 weights: a state_dict (fedhosp pretrain's .pt)")
    parser.add_argument("--trainable", default="", help="all | head | last-N (default: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more run-config settings")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--json", type=Path, default=None, help="write the Dice figures and settings here")
    args = parser.parse_args(argv)
    if not SOURCE.is_dir():
        print(f"skipped: {SOURCE} not found")
        return 0
    out, settings = args.out, settings_for(args)
    write_sites(out / "two-sites", [list(range(0, 15)), list(range(15, 30))])
    write_sites(out / "one-site", [list(range(0, 15)) + list(range(15, 30))])
    figures: dict[str, dict] = {}
    for name in (n.strip() for n in args.runs.split(",") if n.strip()):
        folder, sites, flags = RUNS[name]
        started = time.monotonic()
        final = simulate(out / folder, out / name, sites, args.rounds, flags, settings)
        figures[name] = {"dice": final.get("dice"), "iou": final.get("iou"), "epsilon": final.get("epsilon_max"),
                         "seconds": round(time.monotonic() - started, 1)}
    print("ISBI 2012 membranes, held-out Dice: " + " | ".join(
        f"{SHOWN[n]} {f['dice']:.3f}" for n, f in figures.items()) + f" ({settings})")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "rounds": args.rounds, "runs": figures}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
