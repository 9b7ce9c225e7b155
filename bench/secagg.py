"""SecAgg+ overhead: one SecAgg+ round / one plain round, 5 sites, the same model, in-process simulation.

Both runs train the same synthetic hospitals from the same seed with the real ServerApp loop and
ClientApp (simulation/inprocess.py, no Ray), DP off so the sites' work is equal; a round's time is
the run log's `seconds` (train + evaluate). Plain and SecAgg+ runs alternate, and the ratio is the
median over repeats of (median SecAgg+ round / median plain round) in the same repeat. The SecAgg+
round adds three message rounds, key agreement (ECDH per pair), Shamir sharing and the masks (a
ChaCha20 stream per pair and site, the size of the model, in int64).

Usage: python -m bench.secagg [--sites 5] [--rounds 3] [--images 60] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.data import synthetic
from server import runlog
from simulation.inprocess import run_inprocess


def round_seconds(root: Path, out: Path, sites: int, rounds: int, **settings: Any) -> list[float]:
    cfg = RunConfig.from_mapping({"num-server-rounds": rounds, "local-epochs": 1, "batch-size": 16, "dp-enabled": False,
                                  "min-available-sites": sites, "seed": 1, "data-root": str(root),
                                  "state-root": str(out / "sites"), "out-dir": str(out), **settings})
    run_inprocess(cfg, sites)
    return [float(r["seconds"]) for r in runlog.read(out / runlog.RUN_LOG)]


def rows(r: dict[str, Any], where: str = "in-process", timed: str = "round wall time (s): plain, SecAgg+"
         ) -> list[tuple[str, str, str, str, str]]:
    """bench/table.py's rows for this section (bench/secagg_deployment.py's too: the same ratio, elsewhere)."""
    return [("secagg", f"SecAgg+ round / plain round ({r['sites']} sites, {r['model']}, {where})",
             f"{r['ratio']:.2f}x", "", ""),
            ("secagg", timed, f"{r['plain_round_s']:.2f}, {r['secagg_round_s']:.2f}", "", "")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=60, help="synthetic images per site")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ratios, plain_s, secagg_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hospitals"
        synthetic.write_hospitals(root, args.sites, seed=9, images_per_site=args.images)
        for rep in range(args.repeats):
            plain = statistics.median(round_seconds(root, Path(tmp) / f"plain-{rep}", args.sites, args.rounds))
            masked = statistics.median(round_seconds(root, Path(tmp) / f"secagg-{rep}", args.sites, args.rounds,
                                                     **{"secure-aggregation": "secaggplus",
                                                        "secagg-threshold": max(2, args.sites // 2 + 1)}))
            ratios.append(masked / plain)
            plain_s.append(plain)
            secagg_s.append(masked)
    result = {"sites": args.sites, "rounds": args.rounds, "images": args.images, "model": RunConfig().model,
              "ratio": statistics.median(ratios), "ratios": ratios, "plain_round_s": statistics.median(plain_s),
              "secagg_round_s": statistics.median(secagg_s)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
