"""One gate for every workaround: the Flower version we read, and one switch; closed, Flower runs as shipped."""

import logging
import sys

import pytest

from common import flower_compat
from fedhosp import hospital


@pytest.fixture
def opts(tmp_path):
    return hospital.ClientOptions(server="fl.example.org:9092", ca=tmp_path / "ca.crt", key=tmp_path / "k.key",
                                  data=tmp_path)


def test_open_on_the_pinned_version(monkeypatch):
    monkeypatch.delenv(flower_compat.SWITCH, raising=False)
    assert flower_compat.installed_version() == flower_compat.FLOWER_VERSION  # what pyproject pins
    assert flower_compat.enabled()


def test_another_version_closes_it_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(flower_compat, "installed_version", lambda: "9.9.9")
    monkeypatch.setattr(flower_compat, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=flower_compat.__name__):
        assert not flower_compat.enabled() and not flower_compat.enabled()
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["flwr 9.9.9 is installed"]


@pytest.mark.parametrize("value", ["off", "0", "false", "NO"])
def test_the_switch_closes_it(monkeypatch, value):
    monkeypatch.setenv(flower_compat.SWITCH, value)
    assert not flower_compat.enabled()


def test_a_closed_gate_starts_flowers_own_supernode_and_no_zygote(monkeypatch, opts, tmp_path):
    env, commands = hospital.plan(opts, tmp_path / "home", tmp_path / "warm")
    assert list(commands) == ["clientapp zygote", hospital.TUNNEL, "SuperNode"]
    assert commands["SuperNode"][0] == sys.executable
    assert env["PATH"].startswith(str(tmp_path / "warm"))
    monkeypatch.setenv(flower_compat.SWITCH, "off")
    env, commands = hospital.plan(opts, tmp_path / "home", tmp_path / "warm2")
    assert list(commands) == [hospital.TUNNEL, "SuperNode"]  # no zygote; the tunnel is not a workaround
    assert commands["SuperNode"][0] == "flower-supernode"  # Flower's own, without the shorter waits
    # still every task behind the site's approved-code guard: the shim's fallback, first on PATH
    assert env["PATH"].startswith(str(tmp_path / "warm2"))
    assert "fedhosp.approved_code" in (tmp_path / "warm2" / "flwr-clientapp").read_text()
