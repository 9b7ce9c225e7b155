"""End to end on colour hospitals (RGB PNG + RGB DICOM): `fedhosp simulate` trains a 3-channel resnet18 from
a weights file the test made, the head only under DP, and `fedhosp predict` reads the same colour files."""

import csv
import hashlib

import pytest
import torch

from common.model_card import load_model
from common.models import build_model
from tests import colour_sites

pytestmark = pytest.mark.slow


def test_colour_sites_train_a_three_channel_model_that_predict_reads(fedhosp, tmp_path):
    hospitals = colour_sites.write_hospitals(tmp_path / "hospitals", sites=2, images=12, size=24)
    torch.manual_seed(7)
    weights = tmp_path / "start.pt"
    torch.save(build_model("classification", "resnet18", 3, 2, 16).state_dict(), weights)
    settings = f"model=resnet18 pretrained={weights} trainable=head image-size=16 batch-size=4 local-epochs=1"
    run = fedhosp("simulate", "--sites", 2, "--rounds", 1, "--data", hospitals, "--out", tmp_path / "run",
                  "--engine", "inprocess", "--run-config", settings)
    assert run.returncode == 0, run.stderr[-3000:]

    card, model = load_model(tmp_path / "run" / "model.pt")
    assert card.in_channels == 3 and card.architecture == "resnet18" and card.trainable == "head"
    assert card.pretrained_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    start, final = torch.load(weights), model.state_dict()
    # The backbone kept its weights: bit for bit at each site (tests/common/test_trainable.py); here up to
    # FedAvg's float32 rounding of x * w1 + x * w2 (Flower's weighted mean), at most one unit in the last place.
    for key, value in start.items():
        if not key.startswith("fc."):
            assert torch.allclose(final[key], value, rtol=2**-23, atol=0), key
    assert (final["fc.weight"] - start["fc.weight"]).abs().max() > 1e-3  # the head trained

    site = hospitals / "site-000"
    out = fedhosp("predict", "--model", tmp_path / "run" / "model.pt", "--data", site, "--out", tmp_path / "pred",
                  "--labels", site / "labels.csv", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 input channel(s)" in out.stdout
    with open(tmp_path / "pred" / "predictions.csv") as f:
        predicted = {row["file"] for row in csv.DictReader(f)}
    assert predicted == {f"img-{i:03d}.{'dcm' if i % 3 == 0 else 'png'}" for i in range(12)}
