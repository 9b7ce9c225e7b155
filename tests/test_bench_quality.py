"""bench/quality.py's table: means and spreads over seeds, the best recipe, the generated doc block."""

import statistics

import numpy as np
import pytest

from bench import quality, table


def _run(bacc, auc, federated_only=False, decided=None):
    report = {"balanced-accuracy": bacc, "auc": auc, "sensitivity": 0.5, "specificity": 0.5, "accuracy": 0.7}
    if decided is not None:
        report |= {"threshold": 0.3, "threshold-balanced-accuracy": decided, "threshold-sensitivity": 0.6,
                   "threshold-specificity": 0.7, "threshold-accuracy": 0.68}
    run = {"federated": report, "config": {"model": "m", "trainable": "all", "optimizer": "sgd",
                                           "learning-rate": 0.2, "batch-size": 32}}
    return run if federated_only else {**run, "pooled": report, "local": report}


def _results():
    runs = {"cnn": {"0": _run(0.5, 0.69), "1": _run(0.5, 0.71)},
            "scatter-linear": {"0": _run(0.5, 0.80, decided=0.72), "1": _run(0.5, 0.84, decided=0.76),
                               "2": {"error": "ValueError: x"}},
            "cnn@pbcblood/head": {"0": _run(0.6, 0.7, federated_only=True)}}
    summary = quality.summarize(runs)
    return {"date": "2026-12-03", "commit": "abc", "seeds": [0, 1, 2], "rounds": 30, "epsilon": 8.0, "delta": 1e-5,
            "settings": "image-size=28", "recipes": {"cnn@pbcblood/head": {"pool": "pbcblood"}}, "runs": runs,
            "summary": summary, "best": quality.best(summary), "skipped": {"resnet18@pbcblood/all": "not here"},
            "pretrained": {}, "unfinished": ["cnn seed 2"]}


def test_mean_and_spread_over_the_seeds_that_finished():
    r = _results()
    stat = r["summary"]["scatter-linear"]["federated"]["threshold-balanced-accuracy"]
    assert stat["seeds"] == 2  # the failed seed is left out, not counted as zero
    assert stat["mean"] == pytest.approx(0.74)
    assert stat["spread"] == pytest.approx(statistics.stdev([0.72, 0.76]))
    assert set(r["summary"]["cnn@pbcblood/head"]) == {"federated"}
    assert r["best"] == "scatter-linear"  # by balanced accuracy at its threshold: at 0.5 both are 0.5


def test_scored_at_the_federated_threshold_on_the_benign_score():
    """The card's threshold is on class 1's probability (benign): below it an image is called malignant.
    Every score under 0.5: at 0.5 all malignant; at 0.4 the benign images (0.45) are benign, the malignant
    (0.30) malignant. Taken on class 0's probability instead, all would be malignant at 0.4 too."""
    from simulation.central import TestSet

    labels = np.array([0] * 10 + [1] * 30)
    report = quality._report(_Scores(np.where(labels == 1, 0.45, 0.30)), TestSet(np.zeros((40, 28, 28)), labels), 0.4)
    assert (report["sensitivity"], report["specificity"], report["balanced-accuracy"]) == (1.0, 0.0, 0.5)
    assert report["threshold"] == 0.4
    assert (report["threshold-sensitivity"], report["threshold-specificity"]) == (1.0, 1.0)
    assert report["threshold-balanced-accuracy"] == 1.0 and report["auc"] == 1.0
    unset = quality._report(_Scores(np.where(labels == 1, 0.45, 0.30)), TestSet(np.zeros((40, 28, 28)), labels))
    assert unset["threshold"] == 0.5 and unset["threshold-specificity"] == unset["specificity"] == 0.0


class _Scores:
    """A model that gives each test image (in order) a fixed probability of class 1."""

    def __init__(self, benign):
        self.benign, self.seen = benign, 0

    def eval(self):
        return self

    def cpu(self):
        return self

    def __call__(self, x):
        import torch

        p = torch.tensor(self.benign[self.seen:self.seen + len(x)], dtype=torch.float64)
        self.seen += len(x)
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


def test_passes_of_one_recipe_each_merge_into_one_table():
    r = _results()
    one = {**r, "runs": {"cnn": r["runs"]["cnn"]}, "recipes": {}, "seeds": [0, 1], "skipped": {"scatter-linear": "x"}}
    two = {**r, "runs": {"scatter-linear": r["runs"]["scatter-linear"]}, "seeds": [0, 1, 2], "date": "2026-12-04"}
    merged = quality.merge([one, two])
    assert set(merged["runs"]) == {"cnn", "scatter-linear"} and merged["best"] == "scatter-linear"
    assert merged["seeds"] == [0, 1, 2] and merged["date"] == "2026-12-04" and "scatter-linear" not in merged["skipped"]
    assert merged["summary"]["cnn"] == quality.summarize({"cnn": r["runs"]["cnn"]})["cnn"]
    assert merged["unfinished"] == ["cnn seed 2"]
    later = {**r, "runs": {"cnn": {"2": _run(0.5, 0.7)}}, "unfinished": []}
    assert quality.merge([one, two, later])["unfinished"] == []  # a later pass ran it: no longer listed


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
    assert "| scatter-linear (2 of 3 seeds) | federated | 0.300 ± 0.000 | 0.740 ± 0.028 |" in text
    assert "| cnn@pbcblood/head (1 of 3 seeds) | federated | - | - | - | - | 0.700 | 0.600 |" in text
    assert "Recommended for small DP sites" in text and "`model=m trainable=all optimizer=sgd" in text
    assert "resnet18@pbcblood/all: not run (not here)" in text and "cnn seed 2" in text
    quality.write_doc(r, page)
    assert page.read_text() == text  # regenerating replaces the block, never appends


def test_a_distributed_recipe_is_recommended_with_its_mode():
    r = _results()
    r["runs"]["scatter-linear"]["0"]["config"] |= {"dp-mode": "distributed", "secure-aggregation": "secaggplus",
                                                   "secagg-threshold": 3}
    r["recipes"]["scatter-linear"] = {"settings": {"dp-mode": "distributed", "secagg-threshold": 3,
                                                   "batch-size": 1024}, "rounds": 100}
    text = quality.markdown(r)
    assert "dp-mode=distributed secure-aggregation=secaggplus secagg-threshold=3`" in text
    assert "- scatter-linear: distributed DP" in text and "100 rounds of one DP-SGD step" in text


@pytest.mark.skipif(not quality.TASK_DATA.is_file(), reason="../shared/data/breastmnist absent")
def test_a_whole_split_batch_sizes_the_noise_for_q_1(tmp_path):
    """batch-size above every site's split: every site's Poisson rate is 1, so the smallest site does not set a
    larger noise than the others need (batch 32 sizes it for the largest q_k, the smallest site's)."""
    from bench import distributed_dp
    from common import privacy

    recipe = next(r for r in quality.RECIPES if r.distributed)
    settings = {**quality.SETTINGS, **recipe.settings, "model": recipe.model}
    whole = distributed_dp.calibrate(settings, 0, recipe.rounds, tmp_path / "whole")
    assert whole["sigma-for-q"] == 1.0 and max(whole["train-sizes"]) <= settings["batch-size"]
    assert whole["sigma"] == privacy.noise_multiplier(quality.EPSILON, quality.DELTA, 1.0, recipe.rounds)
    small = distributed_dp.calibrate({**settings, "batch-size": 32}, 0, recipe.rounds, tmp_path / "small")
    assert small["train-sizes"] == whole["train-sizes"]
    assert small["sigma-for-q"] == 1 / -(-min(small["train-sizes"]) // 32)


def test_the_ceiling_probes_exactly_what_the_head_sees():
    """bench/feature_ceiling.py: the features are the head block's input, so the head on them is the model."""
    import torch

    from bench import feature_ceiling
    from common.models import build_model
    from simulation.central import TestSet

    torch.manual_seed(0)
    model = build_model("classification", "scatter-linear", 1, 2, 28).eval()
    images = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
    features = feature_ceiling.head_inputs(model, TestSet(images, np.zeros(5)), 1)
    assert features.shape == (5, model.head.in_features)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)[:, None])
        assert torch.allclose(model.head(torch.from_numpy(features)), expected, atol=1e-6)


def test_the_distributed_dp_block_is_generated_from_its_results(tmp_path):
    """bench/distributed_dp.py --doc: the table and each seed's sigma come from the results, between markers."""
    from bench import distributed_dp, doc_block

    run = {"balanced-accuracy": 0.7, "auc": 0.8, "sensitivity": 0.5, "specificity": 0.9, "epsilon-max": 7.99}
    runs = {"local": {"0": run}, "distributed": {"0": {**run, "auc": 0.9, "sigma": 6.377, "sigma-for-q": 1.0,
                                                       "train-sizes": [30, 40], "batch-size": 1024, "rounds": 100}}}
    text = distributed_dp.markdown({"runs": runs, "summary": distributed_dp.summarize(runs)})
    assert "| distributed | 0.700 ± 0.000 | 0.900 ± 0.000 |" in text
    assert "seed 0: 6.38 for q = 1 (smallest site 30 training images, batch 1024, 100 rounds)" in text
    page = tmp_path / "secure-aggregation.md"
    page.write_text("prose\n")
    with pytest.raises(SystemExit, match=r"no <!-- bench/distributed_dp\.py: begin -->"):
        doc_block.replace(page, distributed_dp.DOC_NAME, text)
    assert page.read_text() == "prose\n"  # a page without the markers is left as it was
