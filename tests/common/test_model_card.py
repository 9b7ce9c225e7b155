"""The model card inside model.pt, and the clear errors a wrong model file gives."""

import re
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.errors import FedhospError, ModelFileError
from common.model_card import CARD_FORMAT, FILE_FORMAT, ModelCard, load_model, read_model_file
from common.models import build_model
from server import checkpoint

RUN = RunConfig(num_server_rounds=3, dp_target_delta=1e-5)


def _records() -> list[dict]:
    """Three rounds of a run log; the most-spending site sat out the last round."""
    evaluate = {"num-examples": 120, "sites": 3, "loss": 0.4, "accuracy": 0.85, "auc": 0.9}
    return [
        {"round": 1, "train": {"epsilon-max": 2.0}, "evaluate": evaluate, "sites_ok": 3},
        {"round": 2, "train": {"epsilon-max": 5.5}, "evaluate": evaluate, "sites_ok": 3},
        {"round": 3, "train": {"epsilon-max": 5.1}, "evaluate": evaluate, "sites_ok": 2},
    ]


def _save(path: Path, card: ModelCard | dict | None, task: str = "classification", model: str = "cnn",
          fmt: int = FILE_FORMAT) -> Path:
    state = build_model(task, model, image_size=32).state_dict()
    checkpoint.save(path, state, RUN.to_mapping(), 3, {}, card=card if isinstance(card, ModelCard) else None)
    if isinstance(card, dict) or fmt != FILE_FORMAT:
        data = torch.load(path, weights_only=True)
        data["format"] = fmt
        if isinstance(card, dict):
            data["card"] = card
            data["config"]["task"] = card["task"]
        torch.save(data, path)
    return path


def test_card_of_a_run_takes_the_largest_epsilon_of_any_round_and_the_last_round_metrics():
    card = checkpoint.model_card(RUN, _records())
    assert (card.task, card.architecture, card.image_size, card.num_classes) == ("classification", "cnn", 32, 2)
    assert card.rounds == 3 and card.sites == 2 and card.epsilon == 5.5 and card.delta == 1e-5
    assert card.metrics["accuracy"] == 0.85
    assert ModelCard.from_dict(card.to_dict()) == card
    text = "\n".join(card.lines())
    assert "ε = 5.5 spent (max over sites), δ = 1e-05" in text and "accuracy 0.85" in text and "decoder v2" in text


def test_card_of_a_run_without_dp_or_rounds():
    card = checkpoint.model_card(RunConfig(dp_enabled=False), [])
    assert card.rounds == 0 and card.epsilon is None and card.delta is None and card.metrics == {}
    assert "trained without differential privacy" in "\n".join(card.lines())


def test_model_file_round_trip(tmp_path):
    card = checkpoint.model_card(RUN, _records())
    loaded, model = load_model(_save(tmp_path / "model.pt", card))
    assert loaded == card
    assert not model.training and isinstance(model, torch.nn.Module)
    assert read_model_file(tmp_path / "model.pt").config["num-server-rounds"] == 3


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("format", "model file format 99, this fedhosp reads 1"),
        ("card-format", f"model card format 7, this fedhosp reads {CARD_FORMAT}"),
        ("no-card", "has no model card"),
        ("task", "model 'cnn' is for classification, not segmentation"),
        ("config", "the card says task 'classification' but the run config says 'segmentation'"),
        ("unknown-task", "task 'detection' is not one fedhosp runs"),
        ("weights", "the weights do not fit a unet for segmentation"),
        ("decoder", "decoder v1"),
        ("not-torch", "is not a fedhosp model file"),
        ("missing", "does not exist"),
    ],
)
def test_wrong_model_files_give_a_clear_error(tmp_path, case, message):
    path = tmp_path / "model.pt"
    good = checkpoint.model_card(RUN, _records()).to_dict()
    if case == "format":
        _save(path, checkpoint.model_card(RUN, _records()), fmt=99)
    elif case == "card-format":
        _save(path, {**good, "format": 7})
    elif case == "no-card":
        _save(path, None)  # what checkpoint-last.pt holds
    elif case == "task":
        _save(path, {**good, "task": "segmentation"})
    elif case == "config":
        _save(path, good)
        data = torch.load(path, weights_only=True)
        data["config"]["task"] = "segmentation"
        torch.save(data, path)
    elif case == "unknown-task":
        _save(path, {**good, "task": "detection"})
    elif case == "weights":
        _save(path, {**good, "task": "segmentation", "architecture": "unet"})  # cnn weights inside
    elif case == "decoder":
        _save(path, {**good, "decoder": "v1"})
    elif case == "not-torch":
        path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelFileError, match=re.escape(message)) as info:
        load_model(path)
    assert isinstance(info.value, FedhospError) and "\n" not in str(info.value)
