import torch
from opacus import GradSampleModule

from common.models import build_model
from common.weights import load_record, to_record


def test_weights_round_trip_through_array_record():
    torch.manual_seed(0)
    source = build_model("classification", "cnn")
    target = build_model("classification", "cnn")
    load_record(target, to_record(source))
    for (k1, v1), (k2, v2) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_opacus_prefix_never_leaks():
    wrapped = GradSampleModule(build_model("classification", "cnn"))
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    record = to_record(wrapped)
    assert not any(k.startswith("_module.") for k in record)
    load_record(build_model("classification", "cnn"), record)  # loads into a plain model
