"""What `fedhosp client` prints is what it runs: the environment and every command, exactly."""

import os
import shlex
import subprocess

import pytest

from fedhosp import certs, hospital, processes


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
    keys = certs.site("hosp-a", tmp_path / "site")
    (tmp_path / "data").mkdir()
    return hospital.ClientOptions(server=f"127.0.0.1:{processes.free_port()}", ca=tmp_path / "certs" / "ca.crt",
                                  key=keys.private, data=tmp_path / "data", device="cpu",
                                  runtime_port=processes.free_port())


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


@pytest.mark.parametrize("warm", [True, False], ids=["zygote", "stock-clientapp"])
def test_the_printed_environment_and_commands_are_the_ones_started(site, started, capsys, warm):
    hospital.join(hospital.ClientOptions(**{**site.__dict__, "warm": warm}))
    env, commands = _replay(capsys.readouterr().out)
    assert commands == [argv for argv, _ in started]
    assert all(started_env == env for _, started_env in started)
    assert len(commands) == (2 if warm else 1) and commands[-1][3] == "flower-supernode"
    assert env["UMASK"] == "077"  # every process of the site writes files its user only can read
    if warm:  # the SuperNode finds the zygote's shim before Flower's own flwr-clientapp
        assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(commands[0][-1])  # its socket's folder


def test_dry_run_prints_the_same_and_starts_nothing(site, started, capsys):
    hospital.join(hospital.ClientOptions(**{**site.__dict__, "dry_run": True}))
    dry = capsys.readouterr().out
    assert not started and not site.state_dir.exists()  # nothing started, nothing of the site's written
    hospital.join(site)
    real = capsys.readouterr().out
    warm_dirs = [os.path.dirname(_replay(out)[1][0][-1]) for out in (real, dry)]  # a fresh private folder each
    assert _replay(dry.replace(warm_dirs[1], warm_dirs[0])) == _replay(real)
