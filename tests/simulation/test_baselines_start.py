"""The pooled and local-only baselines start from the federation's round-1 model: its `pretrained` weights,
its channels, and the same `trainable` blocks (simulation/baselines.py `fit`)."""

import pytest
import torch
from torch.utils.data import TensorDataset

from common.config import RunConfig
from common.models import build_model
from simulation import baselines


def _data(channels: int, n: int = 40, size: int = 28) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, channels, size, size, generator=g), torch.randint(0, 2, (n,), generator=g))


def _weights(tmp_path, model: str, channels: int) -> tuple[dict[str, torch.Tensor], str]:
    torch.manual_seed(1234)  # not the run's seed: fresh weights would differ everywhere
    state = build_model("classification", model, channels, 2, 28).state_dict()
    path = tmp_path / f"{model}.pt"
    torch.save(state, path)
    return state, str(path)


@pytest.mark.parametrize("dp", [False, True])
def test_a_baseline_fit_from_a_weights_file_starts_from_those_weights(tmp_path, dp):
    """trainable = head: every frozen weight is the file's after training (a fresh start would differ),
    and the head, which trained, moved away from the file's."""
    state, path = _weights(tmp_path, "cnn", 1)
    cfg = RunConfig(model="cnn", pretrained=path, trainable="head", num_server_rounds=1, local_epochs=1,
                    batch_size=8, learning_rate=0.5, image_size=28, dp_enabled=dp, dp_target_delta=1e-3, seed=0)
    model, epsilon = baselines.fit(cfg, _data(1), "pooled")
    after = model.state_dict()
    frozen = [k for k in state if not k.startswith("head.")]
    assert frozen and all(torch.equal(after[k].cpu(), state[k]) for k in frozen)
    assert not torch.equal(after["head.weight"].cpu(), state["head.weight"])
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("head."))
    assert (epsilon is not None) == dp and (epsilon is None or epsilon <= 8.0 + 1e-6)


def test_a_colour_backbone_baseline_takes_the_runs_channels(tmp_path):
    """resnet18 (3 channels, the model's own) from a weights file, on colour images: no 1-channel assumption."""
    state, path = _weights(tmp_path, "resnet18", 3)
    cfg = RunConfig(model="resnet18", pretrained=path, trainable="head", num_server_rounds=1, local_epochs=1,
                    batch_size=8, learning_rate=0.1, image_size=28, dp_enabled=False, seed=0)
    model, _ = baselines.fit(cfg, _data(3, n=8), "local:0")
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"].cpu(), state["layer4.1.conv2.weight"])
    assert model.conv1.weight.shape[1] == 3


def test_a_colour_cnn_is_scored_on_the_grey_test_split(tmp_path):
    """channels = 3 with the small CNN: the round's central evaluation builds a 3-channel model and repeats
    the pool's grey test images to it (a 1-channel model would refuse the weights)."""
    import json

    import numpy as np

    from common.weights import to_record
    from simulation.central import CentralEvaluation, TestSet

    cfg = RunConfig(model="cnn", channels=3, image_size=28, out_dir=str(tmp_path))
    torch.manual_seed(0)
    arrays = to_record(build_model("classification", "cnn", 3, 2, 28))
    labels = np.array([0, 1] * 10)
    CentralEvaluation(cfg, TestSet(np.random.default_rng(0).random((20, 28, 28)), labels))(1, arrays)
    line = json.loads((tmp_path / "central.jsonl").read_text().splitlines()[0])
    assert line["round"] == 1 and line["num-examples"] == 20
