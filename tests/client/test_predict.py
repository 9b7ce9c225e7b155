"""`fedhosp predict` at a hospital: the federation's numbers reproduced, outputs on disk, clear errors."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from client.predict import PREDICTIONS, PredictOptions, predict
from common import decision, training
from common.config import RunConfig
from common.data import sources, split
from common.errors import DataError, ModelFileError
from common.model_card import ModelCard
from common.models import build_model
from fedhosp.cli import main
from server import checkpoint


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _validation_labels(trained, path: Path) -> Path:
    """A file,label CSV listing exactly the sites' validation files, relative to the hospitals' root."""
    rows = []
    for site, names in trained.val_names.items():
        labels = {str(e.path.relative_to(trained.root / site)): e.label
                  for e in sources.dicom_folder(trained.root / site)}
        rows += [(f"{site}/{name}", labels[name]) for name in names]
    return _write_csv(path, ("file", "label"), rows)


@pytest.mark.slow
def test_predict_reproduces_the_accuracy_the_server_reported(trained_classifier, tmp_path):
    labels = _validation_labels(trained_classifier, tmp_path / "validation.csv")
    out = tmp_path / "out"
    result = predict(PredictOptions(trained_classifier.model_path, trained_classifier.root, out, labels,
                                    explain=True, device="cpu"))
    reported = trained_classifier.server_evaluate
    print(f"\nserver-reported accuracy {reported['accuracy']:.4f}, predict {result.metrics['accuracy']:.4f}")
    # each site rounds its metrics to 3 decimals (SitePolicy.metric_decimals): so does their mean
    assert result.metrics["accuracy"] == pytest.approx(reported["accuracy"], abs=5e-4)
    assert result.predicted == reported["num-examples"] and not result.skipped
    assert 0.75 < result.metrics["accuracy"] < 1.0  # a real model, not a constant one
    # balanced accuracy, sensitivity, specificity: what the server pools from the sites' confusion grids
    pooled = decision.summarise(reported)
    for key in ("balanced-accuracy", "sensitivity", "specificity"):
        assert result.metrics[key] == pytest.approx(pooled[key], abs=1e-9)

    rows = _read_csv(out / PREDICTIONS)
    assert [r["file"] for r in rows] == [r["file"] for r in _read_csv(labels)]
    probs = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert [int(r["predicted"]) for r in rows] == probs.argmax(axis=1).tolist()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["accuracy"] == result.metrics["accuracy"] and saved["images"] == len(rows)

    heatmaps = sorted((out / "explain").rglob("*.png"))
    assert result.explained == len(heatmaps) == len(rows)
    with Image.open(heatmaps[0]) as img:
        assert img.mode == "RGB" and img.size == (256, 256)


def _save_model(path: Path, model: torch.nn.Module, run: RunConfig, metrics: dict | None = None) -> Path:
    card = ModelCard.for_run(run, rounds=1, sites=1, metrics=metrics or {}, epsilon=None)
    checkpoint.save(path, model.state_dict(), run.to_mapping(), 1, {}, card=card)
    return path


def test_predict_without_labels_reads_every_dicom_file_and_skips_unreadable_ones(hospitals, tmp_path):
    data = tmp_path / "incoming"
    (data / "ward").mkdir(parents=True)
    site = hospitals / "site-000"
    for name in ("img_00000.dcm", "img_00001.dcm", "img_00002.dcm"):
        shutil.copy(site / name, data / "ward" / name)
    shutil.copy(site / "img_00003.dcm", data / "IM0004")  # PACS exports often have no suffix
    (data / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 20)
    (data / "notes.txt").write_text("not an image")
    shutil.copytree(site / "masks", data / "masks")  # PNGs next to the images are not studies
    torch.manual_seed(0)
    model_path = _save_model(tmp_path / "model.pt", build_model("classification", "cnn"), RunConfig())
    out = tmp_path / "out"
    result = predict(PredictOptions(model_path, data, out))
    rows = _read_csv(out / PREDICTIONS)
    assert [r["file"] for r in rows] == ["IM0004", "ward/img_00000.dcm", "ward/img_00001.dcm", "ward/img_00002.dcm"]
    assert set(rows[0]) == {"file", "prob_0", "prob_1", "predicted"}
    assert [name for name, _ in result.skipped] == ["broken.dcm"]
    assert _read_csv(out / "skipped.csv")[0]["file"] == "broken.dcm"
    assert result.metrics is None and not (out / "metrics.json").exists()


def test_segmentation_predict_reproduces_the_site_dice(tmp_path):
    from client.site import Site
    from common.config import SiteConfig
    from common.data import synthetic
    from common.site_policy import SitePolicy
    from common.weights import to_record

    # A site of its own, large enough to learn from (Dice 0.86-0.88 over seeds 0-2; the shared 40-image
    # fixture leaves 6 validation images, where Dice swung from 0.76 to 0.24 with a library update).
    hospitals = tmp_path / "hospitals"
    synthetic.write_hospitals(hospitals, num_sites=1, seed=3, images_per_site=120, lesion_contrast=(0.5, 0.7))
    run = RunConfig(task="segmentation", model="unet", dp_enabled=False, client_threads=1)
    site = Site(run, SiteConfig(str(hospitals / "site-000"), str(tmp_path / "state"), "cpu"),
                own_policy=SitePolicy(min_validation_images=0))  # 18 validation images
    torch.manual_seed(0)
    model = build_model("segmentation", "unet")
    loader = DataLoader(site.data()[0], batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    training.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 20,
                   torch.device("cpu"), training.dice_ce_loss)
    reported = site.evaluate(to_record(model))
    model_path = _save_model(tmp_path / "model.pt", model, run, reported)

    root = hospitals / "site-000"
    examples = sources.dicom_folder(root, "segmentation")
    names = [str(e.path.relative_to(root)) for e in examples]
    val = split.validation_mask(names, run.val_fraction, run.seed)
    rows = [(n, str(e.mask.relative_to(root))) for n, e, v in zip(names, examples, val, strict=True) if v]
    masks = _write_csv(tmp_path / "masks.csv", ("file", "mask"), rows)
    out = tmp_path / "out"
    result = predict(PredictOptions(model_path, root, out, masks, explain=True, device="cpu"))
    print(f"\nsite Dice {reported['dice']:.4f}, predict Dice {result.metrics['dice']:.4f}, "
          f"Hausdorff {result.metrics['hausdorff']} px over {result.metrics['hausdorff-images']} images")
    # the site rounds what it reports to 3 decimals (SitePolicy.metric_decimals)
    assert result.metrics["dice"] == pytest.approx(reported["dice"], abs=5e-4)
    assert result.metrics["dice"] > 0.3 and result.metrics["hausdorff-images"] > 0  # it segments something
    assert result.metrics["iou"] == pytest.approx(reported["iou"], abs=5e-4)
    assert {"hausdorff", "hausdorff-images", "hausdorff-undefined"} <= set(result.metrics)

    predicted = _read_csv(out / PREDICTIONS)
    assert len(predicted) == len(rows) == result.explained
    with Image.open(out / predicted[0]["mask"]) as img:
        pixels = np.asarray(img)
    assert pixels.shape == (run.image_size, run.image_size) and set(np.unique(pixels)) <= {0, 255}
    assert len(list((out / "explain").glob("*.png"))) == len(rows)


def test_ground_truth_of_the_other_task_is_a_clear_error(hospitals, tmp_path):
    model_path = _save_model(tmp_path / "model.pt", build_model("classification", "cnn"), RunConfig())
    site = hospitals / "site-000"
    with pytest.raises(ModelFileError, match=r"the model is for classification but .* holds segmentation"):
        predict(PredictOptions(model_path, site, tmp_path / "out", site / "masks.csv"))


def test_labels_outside_the_data_folder_are_refused(hospitals, tmp_path):
    model_path = _save_model(tmp_path / "model.pt", build_model("classification", "cnn"), RunConfig())
    labels = _write_csv(tmp_path / "labels.csv", ("file", "label"), [("../site-001/img_00000.dcm", 0)])
    with pytest.raises(DataError, match="outside"):
        predict(PredictOptions(model_path, hospitals / "site-000", tmp_path / "out", labels))


def test_cli_prints_the_model_card_and_where_everything_went(hospitals, tmp_path, capsys):
    run = RunConfig(dp_target_delta=1e-5)
    card = ModelCard.for_run(run, rounds=4, sites=3, metrics={"accuracy": 0.8, "num-examples": 50}, epsilon=3.2)
    checkpoint.save(tmp_path / "model.pt", build_model("classification", "cnn").state_dict(), run.to_mapping(),
                    4, {}, card=card)
    site = hospitals / "site-001"
    code = main(["predict", "--model", str(tmp_path / "model.pt"), "--data", str(site), "--out",
                 str(tmp_path / "out"), "--labels", str(site / "labels.csv"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "ε = 3.2 spent (max over sites), δ = 1e-05" in printed and "4 rounds of fedavg, 3 sites" in printed
    assert f"predicted {len(_read_csv(site / 'labels.csv'))} images" in printed and "balanced-accuracy" in printed


def test_cli_turns_a_wrong_model_file_into_one_error_line(tmp_path, capsys):
    checkpoint.save(tmp_path / "checkpoint-last.pt", build_model("classification", "cnn").state_dict(),
                    RunConfig().to_mapping(), 2, {})
    code = main(["predict", "--model", str(tmp_path / "checkpoint-last.pt"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()] == [
        f"error: {tmp_path / 'checkpoint-last.pt'} has no model card: pass the final model.pt of a run "
        "(checkpoint-last.pt is for resuming training)"
    ]


def _collapsed_cnn(bias: float) -> torch.nn.Module:
    """A cnn whose last layer ignores the image: p(class 1) = sigmoid(2·bias) for every image."""
    torch.manual_seed(0)
    model = build_model("classification", "cnn")
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-bias, bias]))
    return model


def test_predict_decides_at_the_cards_threshold_and_reports_0_5_beside_it(hospitals, tmp_path):
    """p(class 1) = 0.31 everywhere: at 0.5 every image is called negative (balanced accuracy 0.5, sensitivity
    0, specificity 1, whatever the accuracy); at the card's 0.3 every image is called positive."""
    from common import metrics as clinical

    site = hospitals / "site-000"
    model = _collapsed_cnn(float(np.log(0.31 / 0.69) / 2))
    model_path = _save_model(tmp_path / "model.pt", model, RunConfig(), metrics={"threshold": 0.3})
    result = predict(PredictOptions(model_path, site, tmp_path / "out", site / "labels.csv", device="cpu"))
    assert result.card.threshold == 0.3
    rows = _read_csv(tmp_path / "out" / PREDICTIONS)
    assert {r["predicted"] for r in rows} == {"1"}  # 0.31 >= 0.3
    at_half = result.metrics["at-0.5"]
    assert (at_half["balanced-accuracy"], at_half["sensitivity"], at_half["specificity"]) == (0.5, 0.0, 1.0)
    at_card = result.metrics
    assert (at_card["threshold"], at_card["balanced-accuracy"], at_card["sensitivity"], at_card["specificity"]) == \
        (0.3, 0.5, 1.0, 0.0)
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    assert at_card["accuracy"] == clinical.classification_report(labels, probs, 0.3)["accuracy"] == labels.mean()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert saved["at-0.5"] == at_half and saved["threshold"] == 0.3


def test_a_card_without_a_threshold_decides_at_0_5(hospitals, tmp_path):
    site = hospitals / "site-000"
    model_path = _save_model(tmp_path / "model.pt", _collapsed_cnn(float(np.log(0.31 / 0.69) / 2)), RunConfig())
    result = predict(PredictOptions(model_path, site, tmp_path / "out", site / "labels.csv", device="cpu"))
    assert result.card.threshold is None and result.metrics["threshold"] == 0.5
    assert {r["predicted"] for r in _read_csv(tmp_path / "out" / PREDICTIONS)} == {"0"}
    assert result.metrics["sensitivity"] == 0.0 and result.metrics["balanced-accuracy"] == 0.5
