"""The research harness: a pool split into sites, baselines, the test split, a reproducible report.

The command runs once on Flower's engine (Ray), as a researcher runs it; the same settings run
again in this process on the in-process engine must give the same numbers: random node ids,
unseeded sampling and reply order under Ray change nothing, and the seed decides everything.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from fedhosp import cli
from simulation import report
from simulation.run import SimulationOptions, simulate
from simulation.virtual_sites import PartitionOptions
from tests import leftovers

PNG = b"\x89PNG\r\n\x1a\n"
SITES = 3
ARGS = ["simulate", "--sites", str(SITES), "--rounds", "2", "--partition", "dirichlet", "--alpha", "0.5",
        "--scanner-shift", "--baselines", "--seed", "4", "--epsilon", "16",
        "--run-config", "image-size=16 local-epochs=1 batch-size=16 dp-target-delta=1e-3"]


def tiny_npz(path, seed=0):
    """A MedMNIST-style archive: 16x16 images whose label is a bright blob, with train/val/test splits."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 2, n)
        images = rng.integers(0, 90, (n, 16, 16)).astype(np.uint8)
        images[labels == 1, 5:11, 5:11] += 120
        return images, labels.reshape(-1, 1)

    arrays = {}
    for name, n in (("train", 160), ("val", 40), ("test", 60)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    np.savez(path, **arrays)
    return path


def metrics(results: dict) -> dict:
    """Everything in results.json that is a measurement: no paths, no timings."""
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    base = {name: {k: v for k, v in b.items() if k != "seconds"} for name, b in (results.get("baselines") or
                                                                               {}).items()}
    return {"rounds": strip(results["rounds"]), "final": results["final"], "site-scores": results["site-scores"],
            "privacy": results["privacy"], "baselines": base, "partition": results["partition"]}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return tiny_npz(tmp_path_factory.mktemp("pool") / "tiny.npz")


@pytest.fixture(scope="module")
def cli_run(pool, tmp_path_factory):
    """The whole command on Flower's engine, as a researcher runs it."""
    out = tmp_path_factory.mktemp("cli")
    marker = f"harness-{uuid.uuid4().hex}"
    proc = subprocess.run([sys.executable, "-m", "fedhosp", *ARGS, "--engine", "ray", "--data", str(pool),
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, leftovers.MARKER: marker})
    left = leftovers.ray_or_flower(marker)  # the moment the command has returned
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not left, left
    return out, proc


def _again(pool, out, *extra, baselines=True):
    """The same command's settings, run in this process on the in-process engine."""
    args = cli.build_parser().parse_args([*ARGS, "--data", str(pool), "--out", str(out), *extra])
    cfg = cli.simulate_config(args)
    opts = SimulationOptions(sites=SITES, synthesize=False, partition=PartitionOptions("dirichlet", 0.5, 1.0),
                             pool_data=pool, baselines=baselines, engine="inprocess")
    return json.loads(report.write(out, cfg.to_mapping(), SITES, simulate(cfg, opts)).read_text())


@pytest.mark.integration
@pytest.mark.slow
def test_same_seed_gives_identical_metrics_with_dp_on_either_engine(cli_run, pool, tmp_path):
    ray_run = json.loads((cli_run[0] / "results.json").read_text())
    assert ray_run["config"]["dp-enabled"] and ray_run["final"]["epsilon_max"] > 0
    assert ray_run["engine"]["kind"] == "ray" and ray_run["memory"]["peak-processes"] > 2
    again = _again(pool, tmp_path / "again")
    assert again["engine"]["kind"] == "inprocess"
    assert metrics(again) == metrics(ray_run)


@pytest.mark.integration
@pytest.mark.slow
def test_another_seed_gives_other_metrics(cli_run, pool, tmp_path):
    first = json.loads((cli_run[0] / "results.json").read_text())
    other = _again(pool, tmp_path / "other", "--seed", "5", baselines=False)
    assert metrics(other)["rounds"] != metrics(first)["rounds"]


@pytest.mark.integration
def test_report_compares_federated_with_pooled_and_local_on_the_test_split(cli_run):
    out, proc = cli_run
    results = json.loads((out / "results.json").read_text())
    assert results["partition"]["sizes"] and sum(results["partition"]["sizes"]) == 200  # train + val pooled
    assert len(results["partition"]["scanners"]) == SITES
    for name in ("pooled", "local"):
        assert results["baselines"][name]["test"]["accuracy"] > 0
        assert [s["site"] for s in results["baselines"][name]["per-site"]] == ["site-000", "site-001", "site-002"]
    assert results["baselines"]["pooled"]["epsilon"] <= 16 * 1.01
    assert results["final"]["test_accuracy"] is not None and results["final"]["site_worst"] is not None
    assert sorted(results["site-scores"]) == ["site-000", "site-001", "site-002"]
    assert sorted(results["privacy"]["per-site"]) == ["site-000", "site-001", "site-002"]
    assert results["memory"]["peak-rss-mb"] > 100
    with open(out / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["test_accuracy"] and r["site_worst"] for r in rows)
    table = [line for line in proc.stderr.splitlines() if line.startswith(("federated", "pooled", "local-only"))]
    # the three rows, then the federated model at the threshold its sites' validation chose
    assert [line.split()[0] for line in table[:3]] == ["federated", "pooled", "local-only"]
    assert all(line.startswith("federated at threshold ") for line in table[3:])
    assert "peak memory of the process tree" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"results: {out / 'results.json'}"


@pytest.mark.integration
def test_plots_are_pngs_and_show_the_baselines(cli_run, tmp_path):
    out, _ = cli_run
    for name in ("curves.png", "sites.png", "privacy.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    results = json.loads((out / "results.json").read_text())
    shown = report.METRICS["classification"]
    report.plot_curves(results["rounds"], tmp_path / "without.png", shown, 16.0, None)
    report.plot_curves(results["rounds"], tmp_path / "with.png", shown, 16.0, results["baselines"])
    assert (tmp_path / "with.png").read_bytes() != (tmp_path / "without.png").read_bytes()
    assert (out / "curves.png").read_bytes() == (tmp_path / "with.png").read_bytes()
    report.plot_sites(results["site-scores"], tmp_path / "sites-only.png", "accuracy", None)
    assert (out / "sites.png").read_bytes() != (tmp_path / "sites-only.png").read_bytes()


def test_round_timeout_grows_with_the_waves_of_sites_unless_set():
    from common.config import ROUND_TIMEOUT_S, RunConfig
    from simulation.run import SECONDS_PER_WAVE, with_round_timeout

    many = SimulationOptions(sites=100, cpus_per_site=1.0)
    scaled = with_round_timeout(RunConfig(), many)
    assert scaled.round_timeout >= SECONDS_PER_WAVE * 100 / (os.cpu_count() or 1)
    assert with_round_timeout(RunConfig(round_timeout=30.0), many).round_timeout == 30.0
    assert with_round_timeout(RunConfig(round_timeout=ROUND_TIMEOUT_S), many).round_timeout == ROUND_TIMEOUT_S  # set
    assert with_round_timeout(RunConfig(), SimulationOptions(sites=2)).round_timeout_s == ROUND_TIMEOUT_S
