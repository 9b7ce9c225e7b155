"""Bad input at the command line: one `error:` line naming the problem, exit 2, no traceback.

The checks run `fedhosp.cli.main` in-process (the `fedhosp` fixture); one runs the real console
entry point in a new Python, for the exit status and stderr a shell sees.
"""

import shutil
import subprocess
import sys

import pytest

from common.config import parse_overrides
from common.errors import ConfigError


def _assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_zero_sites_exits_2_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedhosp", "simulate", "--sites", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    _assert_clean_error(proc, "--sites = 0")


def test_unknown_config_key(fedhosp, tmp_path):
    proc = fedhosp("simulate", "--out", str(tmp_path), "--run-config", "learning-rat=0.1")
    _assert_clean_error(proc, "unknown setting 'learning-rat'", "did you mean 'learning-rate'")


def test_out_of_range_value(fedhosp, tmp_path):
    proc = fedhosp("simulate", "--out", str(tmp_path), "--epsilon", "-1")
    _assert_clean_error(proc, "dp-target-epsilon", "> 0")


def test_missing_data_folder(fedhosp, tmp_path):
    proc = fedhosp("simulate", "--sites", "2", "--out", str(tmp_path), "--data", str(tmp_path / "absent"))
    _assert_clean_error(proc, "site-000 does not exist")


def test_empty_data_folder(fedhosp, tmp_path):
    (tmp_path / "data" / "site-000").mkdir(parents=True)
    proc = fedhosp("simulate", "--sites", "1", "--out", str(tmp_path), "--data", str(tmp_path / "data"))
    _assert_clean_error(proc, "site-000 is empty")


def test_manifest_naming_a_missing_file(fedhosp, hospitals, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(hospitals, data)
    (data / "site-001" / "img_00004.dcm").unlink()
    proc = fedhosp("simulate", "--sites", "2", "--out", str(tmp_path), "--data", str(data))
    _assert_clean_error(proc, "site-001", "labels.csv names 1 missing file(s): img_00004.dcm")


def test_synth_writes_dicom_folders(fedhosp, tmp_path):
    proc = fedhosp("synth", "--sites", "2", "--out", str(tmp_path), "--seed", "1", "--images-per-site", "12")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-000", "site-001"]
    assert (tmp_path / "site-000" / "labels.csv").is_file()
    assert len(list((tmp_path / "site-001").glob("*.dcm"))) > 0


def test_run_config_syntax_is_one_for_every_command():
    assert parse_overrides("a=1 b='two words' c=x d=0.5 e=true f='seg'") == {
        "a": 1, "b": "two words", "c": "x", "d": 0.5, "e": True, "f": "seg"}
    assert parse_overrides("task=segmentation") == parse_overrides("task='segmentation'")
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_overrides("novalue")
    with pytest.raises(ConfigError, match="--run-config"):
        parse_overrides("a='unclosed")


def test_simulate_and_server_read_task_the_same_way(fedhosp, tmp_path):
    """`--task segmentation`, and task='segmentation' in --run-config, both bring the task's model and schedule."""
    from fedhosp.cli import build_parser, simulate_config

    parse = build_parser().parse_args
    by_flag = simulate_config(parse(["simulate", "--task", "segmentation", "--out", str(tmp_path)]))
    by_config = simulate_config(parse(["simulate", "--run-config", "task=segmentation", "--out", str(tmp_path)]))
    assert by_flag == by_config
    assert (by_flag.model, by_flag.learning_rate, by_flag.local_epochs) == ("unet", 0.1, 6)
