"""`fedhosp pretrain`: a public pool in, a state_dict + sidecar out that `pretrained = PATH` loads."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import ConfigError, DataError
from common.models import build_model, pretrained
from fedhosp import cli
from simulation.pretrain import PretrainOptions, pretrain, sidecar

SIZE = 16


def _images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Class k: a bright square at row 4k, so a few epochs learn it."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (len(labels), 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 + 8 * k : 8 + 8 * k, 8:20] = 250
    return images


def _pool(path, classes=3, n=90):
    labels = np.arange(n) % classes
    test = np.arange(30) % classes
    np.savez(path, train_images=_images(labels, 0), train_labels=labels[:, None].astype(np.uint8),
             test_images=_images(test, 1), test_labels=test[:, None].astype(np.uint8))
    return path


def test_pretrain_writes_weights_and_a_sidecar_that_say_what_made_them(tmp_path):
    pool = _pool(tmp_path / "public.npz")
    out = tmp_path / "w" / "cnn-public.pt"
    code = cli.main(["pretrain", "--data", str(pool), "--model", "cnn", "--out", str(out), "--epochs", "8",
                     "--image-size", str(SIZE), "--lr", "0.1"])
    assert code == 0
    card = json.loads(sidecar(out).read_text())
    assert card["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (card["model"], card["num-classes"], card["epochs"], card["train-examples"]) == ("cnn", 3, 8, 90)
    assert card["pool"] == str(pool) and len(card["pool-digest"]) == 32
    assert card["test"]["auc"] == 1.0  # the squares are learnt, scored on the pool's own test split
    state = torch.load(out, weights_only=True)
    torch.manual_seed(0)  # pretrain's seed: the same fresh model it started from
    model = build_model("classification", "cnn", 1, 3, SIZE)
    assert not torch.equal(model.head.weight, state["head.weight"])
    model.load_state_dict(state)  # a plain state_dict of the registry model, every key
    assert set(state) == set(model.state_dict())


@pytest.mark.parametrize(("name", "first", "head"), [("cnn", "features.0.0.weight", "head.weight"),
                                                     ("resnet18", "conv1.weight", "fc.weight")])
def test_the_run_loads_it_for_a_task_with_other_classes(tmp_path, name, first, head):
    """`pretrained = PATH` (common/models/pretrained.py): the pool had 3 classes, the task has 2, so every
    weight but the head's comes from the file and the head keeps its fresh initialisation."""
    out = tmp_path / f"{name}.pt"
    pretrain(PretrainOptions(data=_pool(tmp_path / "p.npz", n=12), model=name, out=out, epochs=1, image_size=SIZE))
    state = torch.load(out, weights_only=True)
    torch.manual_seed(1)
    model = build_model("classification", name, 3 if name == "resnet18" else 1, 2, SIZE)
    fresh_head = model.state_dict()[head].clone()
    pretrained.load(model, str(out), "classification", name)
    assert torch.equal(model.state_dict()[first], state[first])
    assert torch.equal(model.state_dict()[head], fresh_head)


def test_a_labelled_folder_is_a_pool_too(tmp_path):
    for k in (0, 1):
        folder = tmp_path / "pool" / f"class{k}"
        folder.mkdir(parents=True)
        for i, image in enumerate(_images(np.full(6, k), k)):
            Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "scatter.pt"
    card = pretrain(PretrainOptions(data=tmp_path / "pool", model="scatter-linear", out=out, epochs=1,
                                    image_size=SIZE))
    assert (card["num-classes"], card["train-examples"], card["test"]) == (2, 12, None)
    assert set(torch.load(out, weights_only=True)) == {"front.norm.weight", "front.norm.bias", "head.weight",
                                                       "head.bias"}


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"model": "unet"}, ConfigError, "pretrain trains a classification model"),
    ({"model": "vgg"}, ConfigError, "pretrain trains a classification model"),
    ({"epochs": 0}, ConfigError, "--epochs = 0"),
    ({"out": "weights.bin"}, ConfigError, r"name the weights file \*\.pt"),
    ({"data": "missing.npz"}, DataError, "missing.npz"),
])
def test_bad_settings_are_one_clear_error(tmp_path, change, error, match):
    values = {"data": _pool(tmp_path / "p.npz"), "model": "cnn", "out": tmp_path / "w.pt", "image_size": SIZE}
    values.update({k: tmp_path / v if k in ("data", "out") else v for k, v in change.items()})
    with pytest.raises(error, match=match):
        pretrain(PretrainOptions(**values))


def test_a_pool_of_one_class_is_refused(tmp_path):
    pool = tmp_path / "one.npz"
    labels = np.zeros(20, dtype=np.uint8)
    np.savez(pool, train_images=_images(labels, 0), train_labels=labels[:, None])
    with pytest.raises(ConfigError, match="at least two classes"):
        pretrain(PretrainOptions(data=pool, model="cnn", out=tmp_path / "w.pt", image_size=SIZE))


def test_a_scattering_front_takes_the_pools_statistics_and_keeps_them(tmp_path):
    """scatter-linear: pretrain standardises each scattering channel by the pool's own mean and std (the
    GroupNorm's affine), and the SGD on the pool's labels afterwards leaves them as they were computed."""
    from simulation import pool as pools

    path = _pool(tmp_path / "public.npz")
    out = tmp_path / "scatter-public.pt"
    card = pretrain(PretrainOptions(data=path, model="scatter-linear", out=out, image_size=SIZE, epochs=3,
                                    learning_rate=0.5))
    assert card["calibrated"]
    state = torch.load(out, weights_only=True)
    model = build_model("classification", "scatter-linear", 1, 3, SIZE)
    model.load_state_dict(state)
    images = pools.load(path, SIZE, tmp_path / "cache").images
    with torch.no_grad():
        features = model.front(torch.from_numpy(images.astype(np.float32))[:, None]).double()
    assert torch.allclose(features.mean((0, 2, 3)), torch.zeros(81, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(features.std((0, 2, 3), correction=0), torch.ones(81, dtype=torch.float64), atol=1e-3)
    torch.manual_seed(0)
    fresh = build_model("classification", "scatter-linear", 1, 3, SIZE)
    assert not torch.equal(fresh.head.weight, state["head.weight"])  # the head did train on the pool
