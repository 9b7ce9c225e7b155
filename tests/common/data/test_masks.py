import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from client.site import Site
from common.config import RunConfig, SiteConfig
from common.data import masks, sources
from common.data.decode import decode_example
from common.errors import DataError, MaskMismatch

LIVER_SEG = Path(__file__).resolve().parents[2] / "data" / "liver.dcm"


def test_real_dicom_seg_frames_map_to_their_source_images():
    ds = pydicom.dcmread(LIVER_SEG)
    frames = ds.pixel_array
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask = masks.read_seg(LIVER_SEG, uid)
        assert mask.shape == (512, 512) and set(np.unique(mask)) == {0, 1}
        assert np.array_equal(mask, frames[i].astype(np.int64))
    with pytest.raises(DataError, match="no SEG frame references"):
        masks.read_seg(LIVER_SEG, "1.2.3.4")


def test_png_0_255_is_binary_and_npy_is_multiclass(tmp_path):
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert masks.read_mask(tmp_path / "m.png").tolist() == [[0, 1], [1, 0]]
    np.save(tmp_path / "m.npy", np.array([[0, 2], [1, 0]]))
    assert masks.read_mask(tmp_path / "m.npy").max() == 2


def _site(hospitals, tmp_path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(hospitals / "site-000", site)
    return site


def test_missing_mask_names_the_file(hospitals, tmp_path):
    site = _site(hospitals, tmp_path)
    (site / "masks" / "img_00005.png").unlink()
    with pytest.raises(DataError, match=r"masks\.csv names 1 missing file\(s\): img_00005\.png"):
        sources.dicom_folder(site, "segmentation")


def test_mask_size_mismatch_names_both_files(hospitals, tmp_path):
    site = _site(hospitals, tmp_path)
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(site / "masks" / "img_00001.png")
    example = sources.dicom_folder(site, "segmentation")[1]
    with pytest.raises(MaskMismatch, match=r"mask img_00001\.png is 64x64 but image img_00001\.dcm is 128x128"):
        decode_example(example, 32)
    run = RunConfig(task="segmentation", model="unet")
    with pytest.raises(MaskMismatch, match="img_00001"):  # stops the site, is not skipped
        Site(run, SiteConfig(str(site), str(tmp_path / "state"), "cpu")).data()


def test_mask_values_outside_the_class_range_name_the_files(hospitals, tmp_path):
    site = _site(hospitals, tmp_path)
    Image.fromarray(np.full((128, 128), 3, dtype=np.uint8)).save(site / "masks" / "img_00002.png")
    run = RunConfig(task="segmentation", model="unet")
    with pytest.raises(DataError, match=r"masks\.csv: mask values of 1 file\(s\) \(img_00002\.dcm\) reach 3"):
        Site(run, SiteConfig(str(site), str(tmp_path / "state"), "cpu")).data()


def test_synthetic_masks_are_the_lesion(hospitals):
    examples = sources.dicom_folder(hospitals / "site-000", "segmentation")
    labels = {e.path.name: e.label for e in sources.dicom_folder(hospitals / "site-000")}
    for example in examples[:10]:
        _, mask = decode_example(example, 32)
        assert (mask.sum() > 0) == bool(labels[example.path.name])
