import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig, SiteConfig
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_equal_pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(declared) == RunConfig()
    assert set(declared) == set(RunConfig().to_mapping())


def test_round_trip_through_flower_keys():
    cfg = RunConfig.from_mapping({"num-server-rounds": "7", "dp-enabled": "false", "learning-rate": 0.5})
    assert cfg.num_server_rounds == 7 and cfg.dp_enabled is False and cfg.learning_rate == 0.5
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown setting 'num-server-round'.*did you mean 'num-server-rounds'"):
        RunConfig.from_mapping({"num-server-round": 3})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("num-server-rounds", 0, "an integer >= 1"),
        ("dp-target-delta", 1.5, "a number in \\(0, 1\\)"),
        ("fraction-train", "abc", "a number in \\(0, 1\\]"),
        ("task", "detection", "classification"),
        ("batch-size", 2.5, "an integer >= 1"),
        ("dp-enabled", "maybe", "bool"),
        ("max-site-weight", 0, "an integer >= 1"),
        ("max-update-norm", -1.0, "a number >= 0"),
    ],
)
def test_bad_values_name_the_key_and_the_accepted_values(key, value, expected):
    with pytest.raises(ConfigError, match=f"'{key}'.*{expected}"):
        RunConfig.from_mapping({key: value})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        RunConfig().seed = 3  # type: ignore[misc]


def test_site_config_needs_a_data_path():
    with pytest.raises(ConfigError, match="data-path"):
        SiteConfig.from_mapping({"state-dir": "/tmp/x"})
    site = SiteConfig.from_mapping({"data-path": "/d", "state-dir": "/s", "device": "cpu"})
    assert site.device == "cpu"


def test_a_task_brings_its_model_and_schedule_unless_they_are_set():
    """What `flwr run . --run-config "task='segmentation'"` hands the apps: pyproject's defaults, fused."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    seg = RunConfig.from_mapping({**declared, "task": "segmentation"})
    assert (seg.model, seg.learning_rate, seg.local_epochs) == ("unet", 0.1, 6)
    cls = RunConfig.from_mapping(declared)
    assert (cls.model, cls.learning_rate, cls.local_epochs) == ("cnn", 0.05, 3)
    chosen = RunConfig.from_mapping({**declared, "task": "segmentation", "learning-rate": 0.05, "local-epochs": 3})
    assert (chosen.learning_rate, chosen.local_epochs) == (0.05, 3)  # set, even to classification's values
    assert RunConfig.from_mapping(seg.to_mapping()) == seg  # the sites get the resolved values


def test_an_unset_round_timeout_is_none_of_the_values_a_user_can_set():
    assert RunConfig().round_timeout == 0 and RunConfig().round_timeout_s == 600
    assert RunConfig(round_timeout=600).round_timeout == 600  # set: the engine keeps it
