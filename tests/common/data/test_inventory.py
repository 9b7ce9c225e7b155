"""`fedhosp inspect`'s report on a mixed folder of real files: the counts must be right."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from common.data import inventory

DATA = Path(__file__).resolve().parents[2] / "data"


def shipped(name: str) -> str:
    return get_testdata_file(name, download=False)


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Grey, colour, compressed, multi-frame, PNG, a broken file, a SEG, one unlisted file and a note."""
    root = tmp_path / "site"
    (root / "scans").mkdir(parents=True)
    for name in ("MR_small.dcm", "CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        shutil.copy(shipped(name), root / "scans" / name)
    for name in ("emri_small.dcm", "US1_J2KI.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm", "liver.dcm"):
        shutil.copy(DATA / name, root / "scans" / name)
    Image.fromarray(np.full((20, 30), 128, dtype=np.uint8)).save(root / "photo.png")
    (root / "notes.txt").write_text("not an image")
    rows = [("scans/MR_small.dcm", 0), ("scans/CT_small.dcm", 1), ("scans/MR_small_RLE.dcm", 0),
            ("scans/emri_small.dcm", 1), ("scans/US1_J2KI.dcm", 0), ("photo.png", 1),
            ("scans/emri_small_jpeg_2k_lossless_too_short.dcm", 0), ("scans/liver.dcm", 1)]
    (root / "labels.csv").write_text("file,label\n" + "".join(f"{f},{label}\n" for f, label in rows))
    return root


def test_counts_on_a_mixed_folder(mixed):
    inv = inventory.inspect(mixed)
    assert inv.source == "manifest labels.csv"
    assert inv.files == 9 and inv.readable_files == 7
    assert inv.examples == 1 + 1 + 1 + 10 + 1 + 1  # every frame of the multi-frame file counts
    assert inv.images == inv.examples + 1  # the unlisted JPEG-LS file decodes too
    assert inv.unlisted == 1
    assert inv.labels == {"0": 3, "1": 12}
    assert inv.counts["modality"] == {"MR": 5, "CT": 1, "US": 1, "SEG": 1, "(none)": 1}
    assert inv.counts["photometric"] == {"MONOCHROME2": 7, "YBR_ICT": 1, "L": 1}
    assert inv.counts["transfer syntax"]["RLE Lossless"] == 1
    assert inv.counts["transfer syntax"]["JPEG 2000 Image Compression"] == 1
    assert inv.counts["transfer syntax"]["PNG"] == 1
    assert inv.counts["size"]["64x64 x10 frames"] == 2 and inv.counts["size"]["30x20"] == 1  # the broken one too
    assert {u["file"]: u["reason"].split(":")[0] for u in inv.unreadable} == {
        "scans/emri_small_jpeg_2k_lossless_too_short.dcm": "no pixel data element in this Enhanced MR Image Storage",
        "scans/liver.dcm": "a DICOM SEG (segmentation) object",
    }
    assert inv.go and inv.summary.startswith("GO: 15 training image(s) from manifest labels.csv, 2 class(es)")


def test_identifying_tags_are_named_never_shown(mixed):
    inv = inventory.inspect(mixed)
    assert inv.identifying["PatientName"] >= 5 and inv.identifying["PatientID"] >= 5
    report = inventory.render(inv) + inventory.to_json(inv)
    for name in ("MR_small.dcm", "CT_small.dcm"):
        ds = pydicom.dcmread(mixed / "scans" / name, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(ds.get(keyword, "")).strip()
            if len(value) > 3:
                assert value not in report, keyword
    assert "identifying tag present" in inventory.render(inv)


def test_no_go_says_why(mixed):
    (mixed / "labels.csv").unlink()
    inv = inventory.inspect(mixed)
    assert not inv.go and inv.summary.startswith("NO-GO: ") and "holds none of the layouts" in inv.summary
    assert inv.images == 16  # still decodes and counts what is there


def test_a_mask_that_does_not_fit_is_no_go(tmp_path):
    shutil.copy(shipped("MR_small.dcm"), tmp_path / "a.dcm")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "masks.csv").write_text("file,mask\na.dcm,a.png\n")
    inv = inventory.inspect(tmp_path, "segmentation")
    assert not inv.go and "1 mask(s) do not fit their image (a.dcm)" in inv.summary


def test_masks_are_not_counted_as_images(hospitals):
    inv = inventory.inspect(hospitals / "site-000")
    n = len((hospitals / "site-000" / "labels.csv").read_text().splitlines()) - 1
    assert inv.files == n and inv.unlisted == 0 and inv.examples == n and inv.go
