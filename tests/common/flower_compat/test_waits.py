"""Flower's fixed deployment waits, shortened only where we start the process and only on the version we read."""

import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from common import flower_compat
from common.flower_compat import waits as flower_waits
from fedhosp import hospital

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def flower_defaults(monkeypatch):
    """Whatever a test changes in Flower's pull defaults is put back afterwards."""
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))


def test_the_supernode_loop_sleeps_less_only_where_flower_hard_codes_it(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    module = types.SimpleNamespace(time=time)  # stands in for flwr.supernode.start_client_internal
    assert flower_waits.shorten_supernode_loop(module)
    module.time.sleep(3)  # idle: no message pulled
    module.time.sleep(0.5)  # waiting for the clientapp's reply
    module.time.sleep(7)  # anything else: as Flower wrote it
    assert slept == [flower_waits.IDLE_PULL_S, flower_waits.REPLY_CHECK_S, 7]
    assert module.time.monotonic is time.monotonic
    assert flower_waits.shorten_supernode_loop(module)  # twice is once
    module.time.sleep(3)
    assert slept[-1] == flower_waits.IDLE_PULL_S


def test_the_real_supernode_module_still_sleeps_through_its_time_global():
    """If Flower stops calling `time.sleep` through its module global, the patch would silently do nothing."""
    from flwr.supernode import start_client_internal

    source = Path(start_client_internal.__file__).read_text()
    assert start_client_internal.time is time or isinstance(start_client_internal.time, flower_waits._ShorterSleeps)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source


def test_object_pulls_retry_sooner(monkeypatch, flower_defaults):
    waits = []

    class Event(threading.Event):
        def wait(self, timeout=None):  # a back-off, recorded instead of slept; other waits as usual
            if timeout is None:
                return super().wait()
            waits.append(timeout)
            return False

    monkeypatch.setattr(inflatable_utils.threading, "Event", Event)
    monkeypatch.setattr(inflatable_utils.random, "uniform", lambda a, b: 0.0)

    def flaky(tries):
        calls = {}

        def pull(object_id):
            calls[object_id] = calls.get(object_id, 0) + 1
            if calls[object_id] <= tries:
                raise ObjectUnavailableError(object_id)
            return b"x"
        return pull

    assert inflatable_utils.pull_objects(["a"], flaky(2)) == {"a": b"x"}
    assert waits == [1, 2]  # Flower's own back-off
    waits.clear()
    assert flower_waits.shorten_object_pulls()
    assert inflatable_utils.pull_objects(["a"], flaky(6)) == {"a": b"x"}
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_another_flower_version_runs_as_shipped(monkeypatch, flower_defaults):
    monkeypatch.setattr(flower_compat, "FLOWER_VERSION", "0.0.0")
    module = types.SimpleNamespace(time=time)
    before = dict(inflatable_utils.pull_objects.__kwdefaults__)
    assert not flower_waits.shorten_supernode_loop(module) and module.time is time
    assert not flower_waits.shorten_object_pulls()
    assert inflatable_utils.pull_objects.__kwdefaults__ == before


def test_the_site_starts_flowers_own_supernode_behind_the_shorter_waits(tmp_path):
    opts = hospital.ClientOptions(server="fl.example.org:9092", ca=tmp_path / "ca.crt", key=tmp_path / "k.key",
                                  data=tmp_path)
    cmd = hospital.supernode_command(opts)
    launched = hospital.launch_command(opts, cmd)
    assert launched[:3] == [sys.executable, "-m", "common.flower_compat.waits"] and launched[3:] == cmd
    stock = hospital.launch_command(hospital.ClientOptions(**{**opts.__dict__, "short_waits": False}), cmd)
    assert stock == cmd
    # the launcher hands over to Flower's own CLI, arguments and all
    out = subprocess.run([*launched[:3], "flower-supernode", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--superlink" in out.stdout and "--root-certificates" in out.stdout
    bad = subprocess.run([*launched[:3], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "usage: python -m common.flower_compat.waits flower-supernode" in bad.stderr
