"""What `fedhosp client` prints is what it runs: the environment and every command, exactly."""

import os
import shlex
import subprocess

import pytest

from common import flower_compat
from fedhosp import certs, hospital, processes
from tests.fedhosp import provision


def _replay(printed: str) -> tuple[dict[str, str], list[list[str]]]:
    """The environment (and `umask`, as the key UMASK) and the commands a shell would run from the `$ ` lines."""
    env, commands = dict(os.environ), []
    for line in printed.splitlines():
        if not line.startswith("$ "):
            continue
        words = shlex.split(line[2:])
        if words[0] == "umask":
            env["UMASK"] = words[1]
        elif words[0] == "export":
            env.update(w.split("=", 1) for w in words[1:])
        elif words[0] == "unset":
            for name in words[1:]:
                env.pop(name, None)
        else:
            commands.append(words)
    return env, commands


@pytest.fixture
def site(tmp_path):
    certs.init(tmp_path / "certs", ["localhost"])
    keys = provision.site("hosp-a", tmp_path / "site", tmp_path / "certs")
    (tmp_path / "data").mkdir()
    return hospital.ClientOptions(server=f"127.0.0.1:{processes.free_port()}", ca=tmp_path / "certs" / "ca.crt",
                                  key=keys.private, data=tmp_path / "data", device="cpu",
                                  runtime_port=processes.free_port(), tunnel_port=processes.free_port())


@pytest.fixture
def started(monkeypatch):
    """Every process `fedhosp client` starts, as (argv, env); each is replaced by one that exits at once."""
    calls = []
    real = subprocess.Popen

    def record(cmd, **kwargs):
        calls.append((list(cmd), {**kwargs["env"], "UMASK": f"{kwargs.get('umask', -1):03o}"}))
        return real(["true"], **{k: v for k, v in kwargs.items() if k != "env"})

    monkeypatch.setattr(hospital.subprocess, "Popen", record)
    return calls


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(("warm", "compat"), [(True, True), (False, True), (True, False)],
                         ids=["zygote", "stock-clientapp", "flower-workarounds-off"])
def test_the_printed_environment_and_commands_are_the_ones_started(site, started, capsys, monkeypatch, warm, compat):
    if not compat:
        monkeypatch.setattr(flower_compat, "enabled", lambda: False)
    hospital.join(hospital.ClientOptions(**{**site.__dict__, "warm": warm}))
    env, commands = _replay(capsys.readouterr().out)
    assert commands == [argv for argv, _ in started]
    assert all(started_env == env for _, started_env in started)
    zygote = warm and compat
    assert len(commands) == (3 if zygote else 2)
    supernode, tunnel = commands[-1], commands[-2]
    assert "flower-supernode" in (supernode[0], supernode[3])  # as Flower ships it, or behind our shorter waits
    assert (supernode[0] == "flower-supernode") == (not compat)
    # The SuperNode dials the site tunnel, trusting only this start's loopback certificate; the tunnel
    # dials the coordinator with the site's client certificate and trusts only the consortium CA.
    assert tunnel[1:3] == ["-m", "fedhosp.site_tunnel"]
    assert _flag(supernode, "--superlink") == _flag(tunnel, "--listen") == f"127.0.0.1:{site.tunnel_port}"
    assert _flag(supernode, "--root-certificates") == _flag(tunnel, "--loopback-cert")
    assert (_flag(tunnel, "--server"), _flag(tunnel, "--ca")) == (site.server, str(site.ca.resolve()))
    assert _flag(tunnel, "--cert") == str(site.key.with_suffix(".crt").resolve())
    assert _flag(supernode, "--auth-supernode-private-key") == _flag(tunnel, "--key") == str(site.key.resolve())
    assert env["UMASK"] == "077"  # every process of the site writes files its user only can read
    if zygote:  # the SuperNode finds the zygote's shim before Flower's own flwr-clientapp
        # in this start's private folder, with the tunnel's certificate
        assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(_flag(tunnel, "--loopback-cert"))


def test_dry_run_prints_the_same_and_starts_nothing(site, started, capsys):
    hospital.join(hospital.ClientOptions(**{**site.__dict__, "dry_run": True}))
    dry = capsys.readouterr().out
    assert not started and not site.state_dir.exists()  # nothing started, nothing of the site's written
    hospital.join(site)
    real = capsys.readouterr().out
    # a fresh private folder each (the shim, the tunnel's certificate)
    warm_dirs = [os.path.dirname(_flag(_replay(out)[1][-2], "--loopback-cert")) for out in (real, dry)]
    assert _replay(dry.replace(warm_dirs[1], warm_dirs[0])) == _replay(real)
