"""docs/performance.md is written from bench/results.json: every figure on it is one the run measured."""

from bench import performance_doc


def _results(**extra):
    machine = {"date": "2026-12-03T08:00:00+00:00", "cpu": "Some CPU", "cores": 2, "memory_gib": 23.5, "gpu": None,
               "packages": {"flwr": "1.41.0"}, "commit": "abc1234"}
    table = [["Framework", "deployment round / simulation round", "2.71x", "<= 1.5x", "MISSED"],
             ["", "  a | b", "0.3 / 0.6", "", ""]]
    return {"machine": machine, "quick": False, "sections": {"deployment": {}}, "load": {"deployment": [0.4, 0, 0],
            "end": [3.5, 0, 0]}, "seconds": 125.0, "table": table, **extra}


def test_the_page_holds_the_runs_table_and_machine(tmp_path):
    page = performance_doc.write(_results(), tmp_path / "performance.md")
    text = page.read_text()
    assert "| Framework | deployment round / simulation round | 2.71x | <= 1.5x | MISSED |" in text
    assert "|  |   a / b | 0.3 / 0.6 |  |  |" in text  # a cell's own '|' cannot break the table
    assert "commit abc1234" in text and "Some CPU, 2 cores, 23.5 GiB, no GPU" in text and "flwr 1.41.0" in text
    assert "load average 0.4-3.5 (busy machine: timings are noisy)" in text
    assert "--quick" not in text.split("## What each figure is")[0]
    assert "--quick" in performance_doc.render(_results(quick=True))
