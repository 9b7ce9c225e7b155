import shutil

import pytest

from common.data import sources
from common.errors import DataError


def _copy_site(hospitals, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(hospitals / "site-000", site)
    return site


def test_reads_the_manifest(hospitals):
    examples = sources.dicom_folder(hospitals / "site-000")
    assert len(examples) > 20 and {e.label for e in examples} == {0, 1}
    assert all(e.path.is_file() for e in examples)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist: check the site's data-path"):
        sources.dicom_folder(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        sources.dicom_folder(tmp_path)


def test_missing_manifest(hospitals, tmp_path):
    site = _copy_site(hospitals, tmp_path)
    (site / "labels.csv").unlink()
    with pytest.raises(DataError, match=r"labels\.csv is missing: add a CSV with columns file,label"):
        sources.dicom_folder(site)


def test_manifest_naming_a_missing_file(hospitals, tmp_path):
    site = _copy_site(hospitals, tmp_path)
    (site / "img_00003.dcm").unlink()
    with pytest.raises(DataError, match=r"names 1 missing file\(s\): img_00003\.dcm"):
        sources.dicom_folder(site)


def test_bad_label(tmp_path):
    (tmp_path / "labels.csv").write_text("file,label\na.dcm,pneumonia\n")
    with pytest.raises(DataError, match="line 2: label 'pneumonia' is not a class index"):
        sources.dicom_folder(tmp_path)


def test_bad_header(tmp_path):
    (tmp_path / "labels.csv").write_text("image,class\na.dcm,1\n")
    with pytest.raises(DataError, match="header must be 'file,label'"):
        sources.dicom_folder(tmp_path)
