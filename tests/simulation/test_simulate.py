"""End to end: synthetic DICOM hospitals -> Flower's simulation engine -> a model that learned with DP.

A learning smoke test with a wide margin: 3 hospitals of 300 images whose lesions are visible
(contrast 0.2-0.6), ε = 16, 3 rounds of 6 local epochs, on Ray. Checked on data/run seeds 0, 1, 2:
final accuracy 0.908, 0.840, 0.854 and AUC 0.968, 0.925, 0.938; the bars are majority + 0.1 and 0.7.
"""

import csv
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from common.data import split, synthetic
from server import checkpoint
from tests import leftovers

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SITES, ROUNDS = 3, 3


def _majority_rate(data_root, val_fraction, seed) -> float:
    labels = []
    for site in range(SITES):
        with open(data_root / f"site-{site:03d}" / "labels.csv") as f:
            rows = list(csv.DictReader(f))
        mask = split.validation_mask([r["file"] for r in rows], val_fraction, seed)
        labels += [int(r["label"]) for r, held_out in zip(rows, mask, strict=True) if held_out]
    return max(np.mean(labels), 1 - np.mean(labels))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out, hospitals = tmp_path_factory.mktemp("sim"), tmp_path_factory.mktemp("hospitals")
    synthetic.write_hospitals(hospitals, SITES, seed=0, images_per_site=300, lesion_contrast=(0.2, 0.6))
    marker = f"simulate-{uuid.uuid4().hex}"
    proc = subprocess.run(
        [sys.executable, "-m", "fedhosp", "simulate", "--sites", str(SITES), "--rounds", str(ROUNDS),
         "--data", str(hospitals), "--out", str(out), "--seed", "0", "--epsilon", "16",
         "--run-config", "local-epochs=6"],
        capture_output=True, text=True, timeout=900, env={**os.environ, leftovers.MARKER: marker},
    )
    left = leftovers.ray_or_flower(marker)  # the moment the command has returned
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, left, hospitals


def test_dp_federation_learns(run):
    out, _, _, hospitals = run
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert rounds[-1]["loss"] < rounds[0]["loss"]
    majority = _majority_rate(hospitals, results["config"]["val-fraction"], results["config"]["seed"])
    assert results["final"]["accuracy"] > majority + 0.1, (results["final"], majority)
    assert results["final"]["auc"] > 0.7


def test_epsilon_is_reported_cumulative_and_within_target(run):
    out = run[0]
    results = json.loads((out / "results.json").read_text())
    eps = [r["epsilon_max"] for r in results["rounds"]]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] <= results["config"]["dp-target-epsilon"] * 1.01


def test_outputs_progress_and_model(run):
    out, proc = run[:2]
    round_lines = [line for line in proc.stderr.splitlines() if line.startswith("round ")]
    assert len(round_lines) == ROUNDS and "eps_max" in round_lines[-1]
    assert proc.stdout.strip().splitlines()[-1] == f"results: {out / 'results.json'}"
    log = [json.loads(line) for line in (out / "runlog.jsonl").read_text().splitlines()]
    assert [e["round"] for e in log if "round" in e] == list(range(1, ROUNDS + 1))
    # the one assembly (server/assembly.py): the in-process and deployment stacks, plus simulation's own layer
    stack = ["WaitingGrid", "CanonicalGrid", "PromptGrid", "PackedGrid", "InMemoryGrid"]
    assert log[0] == {"event": "grid", "layers": stack}
    assert json.loads((out / "results.json").read_text())["grid"] == stack
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = checkpoint.load(out / "model.pt")
    assert model["round"] == ROUNDS and model["config"]["num-server-rounds"] == ROUNDS
    assert not any(k.startswith("_module.") for k in model["state_dict"])
    assert all(torch.isfinite(v).all() for v in model["state_dict"].values())


def test_no_ray_or_flower_process_left_behind(run):
    assert not run[2]
