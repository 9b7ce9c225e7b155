"""Flower's fixed deployment waits, shortened only where we start the process and only on the version we read."""

import contextlib
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


class _Stop(Exception):
    """Ends Flower's endless SuperNode loop from inside a test."""


class _NodeState:
    """The SuperNode's state: no reply is ready for the first two checks, then the test ends."""

    def __init__(self) -> None:
        self.checks = 0

    def set_node_id(self, node_id: int) -> None:
        pass

    def get_messages_legacy(self, is_reply: bool):
        self.checks += 1
        if self.checks > 2:
            raise _Stop
        return []


def _sleeps_of_the_real_supernode_loop(monkeypatch, module) -> list[float]:
    """Run Flower's own `start_client_internal` loop with no server: one idle pull, then a reply not yet
    ready twice. What it sleeps is recorded, not slept."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    pulls = iter([None, 1])  # no message, then a message of run 1
    monkeypatch.setattr(module, "_pull_and_store_message", lambda **kw: next(pulls))
    monkeypatch.setattr(module, "register_signal_handlers", lambda **kw: None)

    @contextlib.contextmanager
    def connection(**kw):
        yield (7, *(None,) * 7)  # node id, then the connection's calls (never reached)

    monkeypatch.setattr(module, "_init_connection", connection)
    state = _NodeState()
    factory = types.SimpleNamespace(state=lambda: state,
                                    objectstore_factory=types.SimpleNamespace(store=lambda: None))
    with pytest.raises(_Stop):
        module.start_client_internal(state_factory=factory, server_address="127.0.0.1:1", node_config={},
                                     insecure=True, isolation="process")
    return slept


def test_the_real_supernode_loop_idles_and_waits_for_replies_shorter(monkeypatch):
    """Flower's own loop, as shipped and shortened: fails if Flower stops sleeping 3 s / 0.5 s there, or stops
    sleeping through its module's `time` (the patch would then silently do nothing)."""
    from flwr.supernode import start_client_internal as module

    monkeypatch.setattr(module, "time", time)  # as shipped; put back after the test
    assert _sleeps_of_the_real_supernode_loop(monkeypatch, module) == [3, 0.5, 0.5]
    assert flower_waits.shorten_supernode_loop(module)
    shortened = _sleeps_of_the_real_supernode_loop(monkeypatch, module)
    assert shortened == [flower_waits.IDLE_PULL_S, flower_waits.REPLY_CHECK_S, flower_waits.REPLY_CHECK_S]


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
    cmd = hospital.supernode_command(opts, tmp_path / "tunnel.crt")
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
