"""What `simulate` asks of Ray: GPUs and CPUs per site in Flower's backend config, a Ray of its own or a
cluster's address, and a clear refusal, before anything starts, of a GPU share on a machine without GPU."""

import argparse
from pathlib import Path

import pytest

from fedhosp import cli
from simulation import run
from simulation.run import SimulationOptions, backend_config


def test_gpus_per_site_is_what_each_site_reserves():
    config = backend_config(SimulationOptions(sites=8, cpus_per_site=2.0, gpus_per_site=0.25))
    assert config["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert backend_config(SimulationOptions(sites=8))["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_a_ray_of_its_own_unless_given_a_cluster():
    local = backend_config(SimulationOptions(sites=2))["init_args"]
    assert local["address"] == "local"  # not a cluster `ray start` left on this machine
    assert local["object_store_memory"] == run.OBJECT_STORE_BYTES and local["num_cpus"] >= 1
    cluster = backend_config(SimulationOptions(sites=2, ray_address="10.0.0.1:6379"))["init_args"]
    assert cluster["address"] == "10.0.0.1:6379"
    assert not {"num_cpus", "num_gpus", "object_store_memory"} & set(cluster)  # the cluster's size is its own


@pytest.fixture
def no_engine(monkeypatch):
    """No GPU here, whatever this machine has; and fail loudly if the engine were reached."""
    monkeypatch.setattr(run, "local_gpus", lambda: 0)

    def never(*_args, **_kwargs):
        raise AssertionError("the engine started")

    monkeypatch.setattr(run, "_run_engine", never)
    monkeypatch.setattr(run, "prepare_hospitals", never)


def test_a_gpu_share_without_a_gpu_is_refused_before_anything_starts(fedhosp, tmp_path, no_engine):
    finished = fedhosp("simulate", "--sites", "2", "--gpus-per-site", "0.25", "--out", tmp_path)
    assert finished.returncode == 2
    assert "error: --gpus-per-site 0.25, but this machine has no GPU" in finished.stderr
    assert not (tmp_path / "hospitals").exists()


def test_a_cluster_needs_the_ray_engine(fedhosp, tmp_path, no_engine):
    finished = fedhosp("simulate", "--engine", "inprocess", "--ray-address", "auto", "--out", tmp_path)
    assert finished.returncode == 2 and "--ray-address runs on a Ray cluster" in finished.stderr


def _args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["simulate", *argv])


def test_the_cluster_address_comes_from_ray_address_as_ray_reads_it(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cli.ray_address(_args()) == "10.0.0.1:6379"
    assert cli.ray_address(_args("--ray-address", "10.0.0.2:6379")) == "10.0.0.2:6379"
    assert cli.ray_address(_args("--engine", "inprocess")) is None  # the env var is for Ray's engine only
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cli.ray_address(_args()) is None


def test_on_a_cluster_every_path_is_absolute(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = cli.on_shared_paths(_args("--ray-address", "auto", "--out", "runs/x", "--data", "hosp"))
    assert args.out == Path("runs/x").resolve() and args.data == Path("hosp").resolve()
    cfg = cli.simulate_config(args)
    assert Path(cfg.state_root).is_absolute() and Path(cfg.data_root).is_absolute()
    assert cli.on_shared_paths(_args("--out", "runs/x")).out == Path("runs/x")  # on its own Ray: as given


def test_a_cluster_address_nobody_answers_at_is_one_line_at_once(fedhosp, tmp_path, no_engine):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    finished = fedhosp("simulate", "--ray-address", f"127.0.0.1:{port}", "--out", tmp_path)
    assert finished.returncode == 2 and f"--ray-address 127.0.0.1:{port}: no Ray cluster answers" in finished.stderr
    assert not (tmp_path / "hospitals").exists()  # before anything was written
