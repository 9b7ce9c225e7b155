"""`pretrained = PATH | torchvision name`: loaded on the server only, checked for fit, recorded by digest.

Every weights file here is made by the test (no download: torch.hub's download is replaced by one
that fails the test, or that raises as an offline machine does).
"""

import hashlib
import urllib.error

import pytest
import torch
import torchvision

from common.config import RunConfig
from common.errors import ConfigError
from common.model_card import ModelCard
from common.models import build_model, pretrained
from server.app import initial_model


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """torch.hub's cache in tmp; any download attempt fails the test unless a test replaces it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def forbidden(url, path):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(pretrained, "download", forbidden)
    pretrained._KNOWN.clear()


def _resnet18(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return build_model("classification", "resnet18", 3, num_classes, 32)


def _saved(model_or_state, path):
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    torch.save(state, path)
    return path


def test_a_state_dict_file_becomes_the_round_1_model_and_its_digest_is_in_the_card(tmp_path):
    path = _saved(_resnet18(seed=1), tmp_path / "weights.pt")
    cfg = RunConfig(model="resnet18", pretrained=str(path), trainable="head")
    model = initial_model(cfg)
    for key, value in torch.load(path).items():
        assert torch.equal(model.state_dict()[key], value), key
    card = ModelCard.for_run(cfg, rounds=1, sites=2, metrics={}, epsilon=1.0)
    assert card.pretrained == str(path) and card.trainable == "head" and card.in_channels == 3
    assert card.pretrained_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ModelCard.from_dict(card.to_dict()) == card
    assert any(card.pretrained_sha256 in line for line in card.lines())
    pretrained._KNOWN.clear()  # a resumed run in a new process: the digest is computed from the file again
    assert ModelCard.for_run(cfg, 1, 2, {}, 1.0).pretrained_sha256 == card.pretrained_sha256


def test_a_head_of_another_size_stays_fresh_and_the_rest_loads(tmp_path):
    path = _saved(_resnet18(num_classes=5, seed=1), tmp_path / "five-classes.pth")
    model = _resnet18(num_classes=2, seed=2)
    fresh_head = model.fc.weight.detach().clone()
    loaded = pretrained.load(model, str(path), "classification", "resnet18")
    assert loaded.fresh == ("fc.weight", "fc.bias")
    assert torch.equal(model.fc.weight, fresh_head)
    assert torch.equal(model.conv1.weight, torch.load(path)["conv1.weight"])


def test_torchvisions_batchnorm_file_loads_its_affine_weights_into_groupnorm(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=1000)  # BatchNorm, running statistics and all
    path = _saved(reference, tmp_path / "resnet18-torchvision.pth")
    model = _resnet18()
    pretrained.load(model, str(path), "classification", "resnet18")
    assert isinstance(model.bn1, torch.nn.GroupNorm)
    assert torch.equal(model.bn1.weight, reference.bn1.weight) and torch.equal(model.layer4[1].conv2.weight,
                                                                              reference.layer4[1].conv2.weight)


def test_a_wrong_shape_a_missing_file_and_an_unknown_name_are_one_clear_error_each(tmp_path):
    state = _resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    wrong = _saved(state, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match=r"wrong\.pt does not fit model 'resnet18': 1 of another shape "
                                          r"\(layer1\.0\.conv1\.weight: file \[64, 64, 5, 5\], model \[64, 64, 3, 3\]"):
        pretrained.load(_resnet18(), str(wrong), "classification", "resnet18")
    resnet34 = _saved(build_model("classification", "resnet34", 3, 2, 32), tmp_path / "resnet34.pt")
    with pytest.raises(ConfigError, match=r"does not fit model 'resnet18'.*not in the model \(layer1\.2\."):
        pretrained.load(_resnet18(), str(resnet34), "classification", "resnet18")
    with pytest.raises(ConfigError, match=r"pretrained = '.*absent\.pt': no such file"):
        pretrained.load(_resnet18(), str(tmp_path / "absent.pt"), "classification", "resnet18")
    with pytest.raises(ConfigError, match=r"'IMAGENET9K' is not a weights name of resnet18 .*"
                                          r"ResNet18_Weights\.IMAGENET1K_V1"):
        pretrained.load(_resnet18(), "IMAGENET9K", "classification", "resnet18")
    with pytest.raises(ConfigError, match="not a weights name of resnet18"):
        pretrained.load(_resnet18(), "ResNet34_Weights.IMAGENET1K_V1", "classification", "resnet18")
    with pytest.raises(ConfigError, match="model 'cnn' has no torchvision weights"):
        pretrained.load(build_model("classification", "cnn"), "DEFAULT", "classification", "cnn")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"junk\.pt is not a torch weights file"):
        pretrained.load(_resnet18(), str(tmp_path / "junk.pt"), "classification", "resnet18")


def test_a_torchvision_name_reads_torch_hubs_cache_and_never_downloads_there(tmp_path, monkeypatch):
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(4)
    reference = torchvision.models.resnet18(num_classes=1000)
    _saved(reference, cache / "resnet18-f37072fd.pth")  # the file name of ResNet18_Weights.IMAGENET1K_V1's URL
    for name in ("ResNet18_Weights.IMAGENET1K_V1", "IMAGENET1K_V1", "DEFAULT"):
        model = _resnet18()
        loaded = pretrained.load(model, name, "classification", "resnet18")
        assert loaded.path == cache / "resnet18-f37072fd.pth" and loaded.fresh == ("fc.weight", "fc.bias")
        assert torch.equal(model.conv1.weight, reference.conv1.weight)
    unet = build_model("segmentation", "unet-resnet18", 3, 2, 32)  # its encoder takes the same file
    pretrained.load(unet, "IMAGENET1K_V1", "segmentation", "unet-resnet18")
    assert torch.equal(unet.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_offline_without_the_cached_file_the_error_names_the_file_to_place(monkeypatch):
    def offline(url, path):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(pretrained, "download", offline)
    with pytest.raises(ConfigError, match=r"torchvision's file resnet50-0676ba61\.pth is not in torch.hub's cache "
                                          r"and cannot be downloaded .*copy https://download\.pytorch\.org/models/"
                                          r"resnet50-0676ba61\.pth to .*torch-home/hub/checkpoints/"):
        pretrained.load(build_model("classification", "resnet50", 3, 2, 32), "IMAGENET1K_V1", "classification",
                        "resnet50")


def test_sites_build_the_same_model_and_never_read_the_file(tmp_path):
    """The file is read by `initial_model` (the server) only: a site's model takes every weight from the
    round-1 global model, so a site without the file trains the pretrained weights."""
    from client.site import Site
    from common.config import SiteConfig
    from common.weights import to_record

    path = _saved(_resnet18(seed=5), tmp_path / "weights.pt")
    cfg = RunConfig(model="resnet18", pretrained=str(path))
    arrays = to_record(initial_model(cfg))
    path.unlink()  # the site has no such file
    site = Site(cfg, SiteConfig(str(tmp_path), str(tmp_path / "state"), "cpu"), 0)
    model = site.model(arrays)
    assert torch.equal(model.layer2[0].conv1.weight, arrays.to_torch_state_dict()["layer2.0.conv1.weight"])
