"""SecAgg+ overhead in deployment: one SecAgg+ round / one plain round, `fedhosp server` + `fedhosp client`s.

bench/secagg.py measures the ratio in-process; this is the same model, sites and settings as a
consortium runs them, as bench/deployment.py starts them on 127.0.0.1: a SuperLink with TLS and
SuperNode authentication behind nginx with mutual TLS, one `fedhosp client` (SuperNode, site tunnel,
warm clientapp zygote) per site. Two runs in this one invocation, on the same synthetic hospitals,
seed and settings (DP off, as in bench/secagg.py, so the sites' work is equal; each site allows it
with `--policy allow-no-dp=true`): one with `secure-aggregation = off`, then one with `secaggplus`.
Each run has fresh site state folders (decode caches filled before any clock starts). A round's time
is the ServerApp's (the run log's `seconds`: train + evaluate); the ratio is SecAgg+ / plain of the
steady rounds' median (round 2 on; round 1 also carries the ServerApp's and the zygotes' first task).
In deployment a SecAgg+ train round is four message rounds, each a message to every site and a
clientapp task forked at each: on top of the cryptography, three more round trips through the
SuperLink and the SuperNodes' pull loops.

With bench/secagg.py's 60 images a site holds out 12, under its policy's min-validation-images (20),
so every site refuses to evaluate and a round is train plus a refused evaluate, in both runs alike;
`--images 100` makes the sites evaluate too (not measured yet).

Usage: python -m bench.secagg_deployment [--sites 5] [--rounds 3] [--images 60] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bench import deployment, hospitals
from bench.framework import steady
from common.config import RunConfig
from fedhosp import processes

TIMEOUT_S = 330.0  # one run; both fit in the 12 minutes a bench piece may hold the shared machine
SETTINGS = {"local-epochs": 1, "batch-size": 16, "dp-enabled": False, "seed": 1}  # bench/secagg.py's


def secagg_settings(sites: int) -> dict[str, Any]:
    """bench/secagg.py's SecAgg+ settings: a majority of the sites needed to reconstruct a secret."""
    return {"secure-aggregation": "secaggplus", "secagg-threshold": max(2, sites // 2 + 1)}


def run_config(settings: dict[str, Any]) -> str:
    """`--run-config`'s TOML values (strings quoted)."""
    def toml(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"{k}={toml(v)}" for k, v in settings.items())


def run(root: Path, name: str, cfg: RunConfig, sites: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One deployment (bench/deployment.py) of `cfg` with `settings` as its run config; DP off, so allowed."""
    return deployment.deploy(root, cfg, sites, name=name, server_args=("--run-config", run_config(settings)),
                             client_args=("--policy", "allow-no-dp=true"), wait_s=300, timeout_s=TIMEOUT_S)


def measure(root: Path, sites: int, rounds: int, images: int) -> dict[str, Any]:
    common = {**SETTINGS, "num-server-rounds": rounds}
    plain_cfg = hospitals.ready(root, "plain", sites, images, **common)
    masked_cfg = hospitals.ready(root, "secaggplus", sites, images, **common, **secagg_settings(sites))
    plain = run(root, "plain", plain_cfg, sites, common)
    masked = run(root, "secaggplus", masked_cfg, sites, {**common, **secagg_settings(sites)})
    return {"sites": sites, "rounds": rounds, "images_per_site": images, "model": plain_cfg.model,
            "secagg": secagg_settings(sites), "plain": plain, "secaggplus": masked,
            "plain_round_s": steady(plain["round_s"]), "secagg_round_s": steady(masked["round_s"]),
            "ratio": steady(masked["round_s"]) / steady(plain["round_s"]),
            "first_round_ratio": masked["round_s"][0] / plain["round_s"][0]}


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """bench/table.py's rows for this section: bench/secagg.py's, for a deployment."""
    from bench import secagg

    return secagg.rows(r, "deployment: TLS, mTLS, node auth",
                       "deployment round wall time (s): plain, SecAgg+ (steady median)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=60, help="synthetic images per site")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    processes.become_subreaper()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.work or Path(tmp), args.sites, args.rounds, args.images)
    print(f"deployment, {result['sites']} sites: plain rounds {[round(x, 1) for x in result['plain']['round_s']]} s, "
          f"SecAgg+ {[round(x, 1) for x in result['secaggplus']['round_s']]} s: {result['ratio']:.2f}x steady, "
          f"{result['first_round_ratio']:.2f}x round 1")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
