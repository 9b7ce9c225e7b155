"""A site's evaluate reply has the same keys whatever its split: an empty held-out split weighs zero."""

import torch
from torch.utils.data import TensorDataset

from client.site import Site
from common.config import RunConfig, SiteConfig
from common.models import build_model
from common.site_policy import SitePolicy
from common.weights import to_record


def test_an_empty_validation_split_sends_the_usual_keys_with_zero_weight(tmp_path, monkeypatch):
    site = Site(RunConfig(dp_enabled=False), SiteConfig(str(tmp_path), str(tmp_path / "state"), "cpu"),
                own_policy=SitePolicy(min_validation_images=0))  # a site that accepts any split
    empty = TensorDataset(torch.zeros(0, 1, 32, 32), torch.zeros(0, dtype=torch.long))
    monkeypatch.setattr(Site, "data", lambda self: (empty, empty))
    reply = site.evaluate(to_record(build_model("classification", "cnn")))
    assert reply["num-examples"] == 0 and reply["auc-weight"] == 0
    assert {"loss", "accuracy", "auc"} <= set(reply)
