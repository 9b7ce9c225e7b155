"""bench/quality.py's table: means and spreads over seeds, the best recipe, the generated doc block."""

import statistics

import numpy as np
import pytest

from bench import quality, table


def _run(bacc, auc, federated_only=False):
    report = {"balanced-accuracy": bacc, "auc": auc, "sensitivity": 0.5, "specificity": 0.5, "accuracy": 0.7}
    run = {"federated": report}
    return run if federated_only else {**run, "pooled": report, "local": report}


def _results():
    runs = {"cnn": {"0": _run(0.5, 0.69), "1": _run(0.5, 0.71)},
            "scatter-linear": {"0": _run(0.72, 0.80), "1": _run(0.76, 0.84), "2": {"error": "ValueError: x"}},
            "cnn@pbcblood/head": {"0": _run(0.6, 0.7, federated_only=True)}}
    summary = quality.summarize(runs)
    return {"date": "2026-12-03", "commit": "abc", "seeds": [0, 1, 2], "rounds": 30, "epsilon": 8.0, "delta": 1e-5,
            "settings": "image-size=28", "recipes": {"cnn@pbcblood/head": {"pool": "pbcblood"}}, "runs": runs,
            "summary": summary, "best": quality.best(summary), "skipped": {"resnet18@pbcblood/all": "not here"},
            "pretrained": {}, "unfinished": ["cnn seed 2"]}


def test_mean_and_spread_over_the_seeds_that_finished():
    r = _results()
    stat = r["summary"]["scatter-linear"]["federated"]["balanced-accuracy"]
    assert stat["seeds"] == 2  # the failed seed is left out, not counted as zero
    assert stat["mean"] == pytest.approx(0.74)
    assert stat["spread"] == pytest.approx(statistics.stdev([0.72, 0.76]))
    assert set(r["summary"]["cnn@pbcblood/head"]) == {"federated"}
    assert r["best"] == "scatter-linear"


def test_the_collapse_is_visible_in_the_report():
    """Predicting the majority class everywhere: accuracy 0.731, balanced accuracy 0.5, sensitivity 0."""
    labels = np.array([0] * 42 + [1] * 114)  # BreastMNIST's test split: 0 malignant, 1 benign/normal

    class Benign:
        def eval(self):
            return self

        def cpu(self):
            return self

        def __call__(self, x):
            import torch

            return torch.tensor([[-5.0, 5.0]]).repeat(len(x), 1)

    from simulation.central import TestSet

    report = quality._report(Benign(), TestSet(np.zeros((156, 28, 28), np.float32), labels))
    assert report["accuracy"] == pytest.approx(114 / 156)
    assert (report["balanced-accuracy"], report["sensitivity"], report["specificity"]) == (0.5, 0.0, 1.0)


def test_rows_and_doc_block(tmp_path):
    r = _results()
    rows = quality.rows(r)
    best = [row for row in rows if "[best]" in row[1]]
    assert len(best) == 1 and "scatter-linear" in best[0][1] and best[0][4] == "MISSED"
    assert any("skipped" in row[1] for row in rows)
    import bench.__main__ as bench_main

    assert "quality" in bench_main.SECTIONS and table.ROWS["quality"] is quality.rows  # `make bench` prints them
    page = tmp_path / "simulation.md"
    page.write_text(f"intro\n{quality.DOC_BEGIN}\nold table\n{quality.DOC_END}\nafter\n")
    quality.write_doc(r, page)
    text = page.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| scatter-linear (2 of 3 seeds) | federated | 0.740 ± 0.028 |" in text
    assert "| cnn@pbcblood/head (1 of 3 seeds) | federated | 0.600 | 0.700 |" in text
    assert "resnet18@pbcblood/all: not run (not here)" in text and "cnn seed 2" in text
    quality.write_doc(r, page)
    assert page.read_text() == text  # regenerating replaces the block, never appends
