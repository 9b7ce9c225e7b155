"""`fedhosp sweep`: every cell of a grid runs into its own folder, one table averages over seeds, and a
failed cell is a row of that table, not the end of the sweep. In-process engine: no Ray, seconds."""

import csv
import json

import pytest

from fedhosp import cli
from simulation import sweep

TINY = ["--engine", "inprocess", "--sites", "2", "--rounds", "1", "--images-per-site", "20", "--no-dp",
        "--run-config", "image-size=16"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def swept(fedhosp, tmp_path, monkeypatch):
    """A 2 x 2 grid in which one cell crashes (as an engine would), and a third seed whose value is invalid."""
    real = cli.run_simulate

    def crash_one(args):
        if args.out.name == "strategy-fedprox_seed-1":
            raise RuntimeError("engine crashed")
        return real(args)

    monkeypatch.setattr(cli, "run_simulate", crash_one)
    finished = fedhosp("sweep", "--grid", "strategy=fedavg,fedprox seed=0,1,x", "--out", tmp_path, *TINY)
    return tmp_path, finished


def test_every_cell_runs_into_its_own_folder_and_failures_are_rows(swept):
    out, finished = swept
    assert finished.returncode == 1  # some cells failed: a script can tell, the table is there all the same
    cells = {(r["strategy"], r["seed"]): r for r in _rows(out / sweep.CELLS_CSV)}
    assert len(cells) == 6
    for ok in [("fedavg", "0"), ("fedavg", "1"), ("fedprox", "0")]:
        assert cells[ok]["status"] == "ok" and float(cells[ok]["accuracy"]) >= 0
        results = json.loads((out / cells[ok]["out"] / "results.json").read_text())
        assert results["config"]["strategy"] == ok[0] and results["config"]["seed"] == int(ok[1])
    assert cells[("fedprox", "1")]["error"] == "RuntimeError: engine crashed"
    assert "seed" in cells[("fedavg", "x")]["error"] and cells[("fedavg", "x")]["status"] == "failed"


def test_the_table_averages_over_the_seeds_that_ran(swept):
    out, finished = swept
    by_strategy = {r["strategy"]: r for r in _rows(out / sweep.SUMMARY_CSV)}
    cells = _rows(out / sweep.CELLS_CSV)
    fedavg = [float(r["accuracy"]) for r in cells if r["strategy"] == "fedavg" and r["status"] == "ok"]
    assert by_strategy["fedavg"]["ok"] == "2" and by_strategy["fedavg"]["failed"] == "1"
    assert float(by_strategy["fedavg"]["accuracy_mean"]) == pytest.approx(sum(fedavg) / 2)
    assert float(by_strategy["fedavg"]["accuracy_std"]) == pytest.approx(abs(fedavg[0] - fedavg[1]) / 2 ** 0.5)
    assert by_strategy["fedprox"]["ok"] == "1" and float(by_strategy["fedprox"]["accuracy_std"]) == 0.0
    assert "engine crashed" in by_strategy["fedprox"]["errors"]
    assert (out / sweep.PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"table: {out / sweep.SUMMARY_CSV}" in finished.stdout


def test_a_mistyped_grid_key_stops_before_any_cell(fedhosp, tmp_path):
    finished = fedhosp("sweep", "--grid", "stratgy=fedavg seed=0", "--out", tmp_path, *TINY)
    assert finished.returncode == 2 and "'stratgy' is not a run setting" in finished.stderr
    assert not list(tmp_path.iterdir())


def test_grid_cells_vary_the_last_key_fastest():
    grid = sweep.parse_grid("strategy=fedavg,fedprox dp-target-epsilon=1,8 seed=0,1,2")
    names = [c.name for c in sweep.cells(grid)]
    assert len(names) == 12 and names[:2] == ["strategy-fedavg_dp-target-epsilon-1_seed-0",
                                              "strategy-fedavg_dp-target-epsilon-1_seed-1"]
