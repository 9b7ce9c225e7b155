"""Shared fixtures: tiny synthetic hospitals and a trained classifier, made once per session."""

from __future__ import annotations

import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from common import flower_env, process_tree, training
from common.config import RunConfig
from common.data import sources, split, synthetic
from common.models import build_model
from tests import leftovers

flower_env.apply()  # as the `fedhosp` command does (fedhosp/__init__.py): tests that run Flower without it

# The longest test files (make test's --durations report), started first: with two workers taking whole
# files (--dist loadfile) in collection order, a long file collected last runs alone at the end.
LONGEST_FIRST = ("tests/fedhosp/test_deployment.py", "tests/test_bench_gpu_check.py",
                 "tests/simulation/test_simulate_segmentation.py", "tests/simulation/test_simulate.py",
                 "tests/simulation/test_harness.py", "tests/simulation/test_teardown.py",
                 "tests/simulation/test_cluster.py", "tests/fedhosp/test_control_api.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order only: every worker sorts the same collection the same way (a stable sort keeps the rest)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = Path(config.rootpath)
    items.sort(key=lambda item: rank.get(Path(item.path).relative_to(root).as_posix(), len(rank)))


# Commands that start Ray or Flower wait for them to exit before they return: what is still alive this
# long after a test file ended was left behind (and is killed, so that the next file starts clean).
LEFTOVER_WAIT_S = 2.0


@pytest.fixture(scope="session", autouse=True)
def _session_marker():
    """Every process the tests start carries this session's marker (leftovers.py finds them by it)."""
    os.environ[leftovers.MARKER] = f"fedhosp-tests-{uuid.uuid4().hex}"
    yield os.environ[leftovers.MARKER]


@pytest.fixture(scope="module", autouse=True)
def _no_ray_or_flower_left(_session_marker):
    """After each test file (its module fixtures stopped): no Ray or Flower process it started is alive."""
    yield
    ours = [p for p in leftovers.marked(_session_marker) if any(n in leftovers.command(p) for n in leftovers.NAMES)]
    alive = process_tree.wait_gone(ours, LEFTOVER_WAIT_S)
    names = [leftovers.command(p) for p in alive]
    for proc in alive:
        process_tree.send(proc, signal.SIGKILL)
    assert not alive, f"Ray / Flower processes outlived this test file: {names}"


@dataclass(frozen=True)
class Finished:
    """What a `fedhosp ...` command left: the fields of subprocess.CompletedProcess the tests read."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def fedhosp(capsys):
    """`fedhosp ARGS` in this process: the console script's own main(), without a new Python importing
    torch for every error message (test_cli.py keeps one real subprocess for the exit path)."""
    from fedhosp.cli import main

    def run(*args) -> Finished:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        out = capsys.readouterr()
        return Finished(int(code or 0), out.out, out.err)

    return run


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests share 2 cores with each other's subprocesses; keep torch to one thread."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hospitals(tmp_path_factory) -> Path:
    """Two small synthetic hospitals (site-000 MONOCHROME2, site-001 ...), seed 3."""
    root = tmp_path_factory.mktemp("hospitals")
    synthetic.write_hospitals(root, num_sites=2, seed=3, images_per_site=40)
    return root


@dataclass(frozen=True)
class TrainedClassifier:
    """A SmallCNN trained on two synthetic sites, its model file, and what the server reported for it."""

    root: Path  # site-000/, site-001/ (DICOM, labels.csv, masks.csv)
    model_path: Path  # model.pt with its model card, as server/checkpoint.py writes it
    model: torch.nn.Module
    run: RunConfig
    val_names: dict[str, list[str]]  # per site: the files of its validation split
    server_evaluate: dict[str, float]  # the sites' evaluate replies, aggregated by the server's strategy


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory) -> TrainedClassifier:
    """Trained without DP on the sites' own training splits (~700 images, 20 epochs, ~15 s on one core).

    The sites decode, split and evaluate with client/site.py's own code, and the server's
    metric aggregation makes the accuracy the server would have reported.
    """
    from flwr.app import MetricRecord, RecordDict

    from client.site import Site
    from common.config import SiteConfig
    from common.weights import plain_state_dict, to_record
    from server import checkpoint
    from server.app import RoundResult
    from server.strategies import aggregate_metrics

    torch.set_num_threads(1)  # session fixtures run before the autouse one above
    base = tmp_path_factory.mktemp("trained")
    synthetic.write_hospitals(base / "hospitals", num_sites=2, seed=21, images_per_site=400)
    run = RunConfig(dp_enabled=False, client_threads=1)
    sites = [Site(run, SiteConfig(str(base / "hospitals" / name), str(base / "state" / name), "cpu"), i)
             for i, name in enumerate(("site-000", "site-001"))]
    torch.manual_seed(0)
    model = build_model("classification", "cnn", image_size=run.image_size)
    train_sets = ConcatDataset([site.data()[0] for site in sites])
    loader = DataLoader(train_sets, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    training.train(model, loader, optimizer, epochs=20, device=torch.device("cpu"))
    replies = [RecordDict({"metrics": MetricRecord(site.evaluate(to_record(model)))}) for site in sites]
    evaluate = dict(aggregate_metrics(replies))
    record = RoundResult(1, evaluate=evaluate, sites_ok=len(sites)).to_json()
    model_path = base / "model.pt"
    checkpoint.save(model_path, plain_state_dict(model), run.to_mapping(), 1, record,
                    card=checkpoint.model_card(run, [record]))
    return TrainedClassifier(base / "hospitals", model_path, model.eval(), run,
                             {Path(s.config.data_path).name: _val_names(s) for s in sites}, evaluate)


def _val_names(site) -> list[str]:
    """The files of a site's validation split, chosen as Site.data() chooses them."""
    root = Path(site.config.data_path)
    names = [str(e.path.relative_to(root)) for e in sources.dicom_folder(root)]
    return [n for n, v in zip(names, split.validation_mask(names, site.run.val_fraction, site.run.seed),
                              strict=True) if v]
