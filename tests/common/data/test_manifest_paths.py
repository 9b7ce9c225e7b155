"""A manifest names files inside its own folder only: `..`, absolute paths and symlinks leading out are refused,
and the error names the manifest and its line."""

import os
import shutil

import pytest

from common.data import sources
from common.errors import DataError


@pytest.fixture
def site(hospitals, tmp_path):
    folder = tmp_path / "site"
    shutil.copytree(hospitals / "site-000", folder)
    (tmp_path / "outside.dcm").write_bytes((folder / "img_00000.dcm").read_bytes())
    return folder


def _manifest(site, name: str) -> None:
    (site / "labels.csv").write_text(f"file,label\nimg_00001.dcm,0\n{name},1\n")


@pytest.mark.parametrize("name", ["../outside.dcm", "sub/../../outside.dcm", "ABSOLUTE", "link.dcm", "linked"])
def test_a_path_leading_out_of_the_data_folder_is_refused(site, name):
    outside = site.parent / "outside.dcm"
    if name == "ABSOLUTE":
        name = str(outside)
    elif name == "link.dcm":
        os.symlink(outside, site / name)
    elif name == "linked":  # a folder row holding a symlink that leads out
        (site / name).mkdir()
        os.symlink(outside, site / name / "x.dcm")
    _manifest(site, name)
    with pytest.raises(DataError, match=r"labels\.csv line 3: .* is outside the data folder"):
        sources.load(site)


def test_a_symlink_inside_the_folder_is_fine(site):
    os.symlink(site / "img_00002.dcm", site / "alias.dcm")
    _manifest(site, "alias.dcm")
    assert len(sources.load(site)) == 2


def test_a_mask_leading_out_is_refused(site):
    (site / "masks.csv").write_text("file,mask\nimg_00001.dcm,../outside.dcm\n")
    with pytest.raises(DataError, match=r"masks\.csv line 2: '\.\./outside\.dcm' is outside"):
        sources.load(site, "segmentation")
