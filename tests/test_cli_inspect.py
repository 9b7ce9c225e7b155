"""`fedhosp inspect DATA [--json]`: a table by default, JSON on request, exit 0 on go and 1 on no-go."""

import json
import shutil
from pathlib import Path

from pydicom.data import get_testdata_file

DATA = Path(__file__).resolve().parent / "data"


def _site(root: Path) -> Path:
    root.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), root / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small_RLE.dcm", download=False), root / "mr.dcm")
    shutil.copy(DATA / "emri_small.dcm", root / "cine.dcm")
    (root / "broken.dcm").write_bytes(b"DICM but not really")
    (root / "labels.csv").write_text("file,label\nct.dcm,1\nmr.dcm,0\ncine.dcm,0\nbroken.dcm,1\n")
    return root


def test_inspect_prints_a_table_and_a_go_line(fedhosp, tmp_path):
    proc = fedhosp("inspect", str(_site(tmp_path / "site")))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "modality" in out and "transfer syntax" in out and "RLE Lossless" in out
    assert "broken.dcm: not a readable DICOM file" in out
    assert out.strip().splitlines()[-1].startswith("GO: 12 training image(s) from manifest labels.csv, 2 class(es)")


def test_inspect_json(fedhosp, tmp_path):
    proc = fedhosp("inspect", str(_site(tmp_path / "site")), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["go"] and report["examples"] == 12 and report["labels"] == {"1": 1, "0": 11}
    assert report["counts"]["modality"] == {"CT": 1, "MR": 2}
    assert [u["file"] for u in report["unreadable"]] == ["broken.dcm"]


def test_inspect_no_go_exits_1(fedhosp, tmp_path):
    site = _site(tmp_path / "site")
    (site / "labels.csv").unlink()
    proc = fedhosp("inspect", str(site))
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].startswith(f"NO-GO: {site} holds none of the layouts")


def test_inspect_a_missing_folder_is_an_error(fedhosp, tmp_path):
    proc = fedhosp("inspect", str(tmp_path / "absent"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {tmp_path / 'absent'} is not a folder" in proc.stderr
