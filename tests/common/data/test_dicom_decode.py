"""Decoding real DICOM files: physical units, windows, orientation, colour, frames and codecs.

Files come from pydicom's own package (no download) and tests/data (see its README).
"""

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import JPEG2000Lossless

from common.data import dicom, pixels, windows
from common.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[2] / "data"
REAL_CT = Path(__file__).resolve().parents[4] / "shared" / "data" / "dicom" / "ct_head_ge"
LUNG_C, LUNG_W = windows.PRESETS["CT"]["lung"]


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def shipped(name: str) -> str:
    return get_testdata_file(name, download=False)


def hounsfield(display: np.ndarray) -> np.ndarray:
    """Invert pydicom's LINEAR lung window: display -> HU (exact inside the window)."""
    return (display - 0.5) * (LUNG_W - 1) + LUNG_C - 0.5


def air_peak(hu: np.ndarray) -> float:
    """The most common value between -1150 and -850 HU, in 10 HU bins: where air sits."""
    counts, edges = np.histogram(hu, bins=30, range=(-1150, -850))
    return float(edges[counts.argmax()] + 5)


def test_ct_is_rescaled_to_hounsfield_units():
    hu = hounsfield(dicom.frames(shipped("693_J2KI.dcm"), window="lung")[0])
    assert abs(air_peak(hu) - (-1000)) <= 30
    ds = pydicom.dcmread(shipped("693_J2KI.dcm"))
    reference = apply_modality_lut(ds.pixel_array, ds)  # RescaleIntercept -1024
    inside = (reference > LUNG_C - LUNG_W / 2 + 1) & (reference < LUNG_C + LUNG_W / 2 - 1)
    assert inside.mean() > 0.3
    assert np.abs(hu - reference)[inside].max() < 0.5


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="shared/data is not beside this checkout")
def test_real_head_ct_series_in_hounsfield_units():
    hu = hounsfield(dicom.frames(REAL_CT / "14.dcm", window="lung")[0])
    assert abs(air_peak(hu) - (-1000)) <= 30
    brain = dicom.frames(REAL_CT / "14.dcm", window="brain")[0]
    assert 0.05 < (brain > 0.2).mean() < 0.6  # brain tissue (0-80 HU) fills part of the slice, not all of it


def test_presets_apply_to_their_modality_only():
    ct = shipped("CT_small.dcm")
    brain, lung = dicom.frames(ct, window="brain")[0], dicom.frames(ct, window="lung")[0]
    assert not np.allclose(brain, lung)
    mr = shipped("MR_small.dcm")
    assert np.array_equal(dicom.frames(mr, window="lung"), dicom.frames(mr))  # HU presets mean nothing for MR
    with pytest.raises(ConfigError, match="window 'lungs' is unknown"):
        windows.check("lungs")


def test_file_window_is_used_and_rows_stay_in_order():
    """MR_small carries Window 600/1600: the display is exactly pydicom's windowing, row for row."""
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    decoded = dicom.frames(shipped("MR_small.dcm"))[0]
    expected = windows.linear(apply_modality_lut(ds.pixel_array, ds), 600, 1600)
    assert np.array_equal(decoded, expected)
    assert not np.allclose(decoded, decoded[::-1])  # and the image is not symmetric, so a flip would show


def test_ct_without_a_window_gets_the_soft_tissue_preset():
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    assert "WindowCenter" not in ds
    assert np.array_equal(dicom.frames(shipped("CT_small.dcm"))[0],
                          dicom.frames(shipped("CT_small.dcm"), window="soft-tissue")[0])


@pytest.mark.parametrize("variant", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                     "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm"])
def test_lossless_encodings_decode_identically(variant):
    assert np.array_equal(dicom.frames(shipped(variant)), dicom.frames(shipped("MR_small.dcm")))


def test_colour_encodings_of_one_image_give_the_same_grey():
    reference = dicom.frames(shipped("SC_rgb_rle.dcm"))[0]  # RGB
    assert np.array_equal(dicom.frames(shipped("SC_rgb_jpeg_gdcm.dcm"))[0], reference)  # JPEG lossless RGB
    assert np.abs(dicom.frames(shipped("SC_ybr_full_422_uncompressed.dcm"))[0] - reference).max() <= 2 / 255
    assert np.abs(dicom.frames(shipped("SC_rgb_dcmtk_+eb+cy+n1.dcm"))[0] - reference).max() <= 8 / 255  # lossy


def test_jpeg2000_ybr_ultrasound_to_grey():
    grey = dicom.frames(DATA / "US1_J2KI.dcm")
    assert grey.shape == (1, 480, 640) and grey.min() >= 0 and grey.max() <= 1
    ds = pydicom.dcmread(DATA / "US1_J2KI.dcm")
    rgb = ds.pixel_array.astype(np.float64)  # pydicom converts YBR_ICT to RGB
    assert np.abs(grey[0] - rgb @ dicom.LUMA / 255).max() <= 0.51 / 255  # pydicom rounds Y to an integer


def test_palette_colour_to_grey():
    path = DATA / "OBXXXX1A_rle.dcm"
    grey = dicom.frames(path)[0]
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    assert np.abs(grey - (rgb @ dicom.LUMA) / 65535).max() < 1 / 255


def test_every_frame_of_a_multi_frame_file():
    path = DATA / "emri_small.dcm"
    stack = dicom.frames(path)
    assert stack.shape == (10, 64, 64)
    assert np.array_equal(dicom.frames(path, index=7)[0], stack[7])
    assert not np.array_equal(stack[0], stack[9])
    with pytest.raises(DataError, match="frame 10 does not exist: the file has 10 frame"):
        dicom.frames(path, index=10)


def test_monochrome1_is_inverted_and_the_first_row_is_the_top(tmp_path):
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    stored = np.zeros((64, 64), dtype=np.int16)
    stored[:8] = 2000  # a band along the top of the stored image
    ds.PixelData = stored.tobytes()
    for photometric, top_is_bright in (("MONOCHROME2", True), ("MONOCHROME1", False)):
        ds.PhotometricInterpretation = photometric
        ds.save_as(tmp_path / f"{photometric}.dcm")
        image = dicom.frames(tmp_path / f"{photometric}.dcm")[0]
        assert (image[:8].mean() > image[8:].mean()) == top_is_bright


def test_a_voi_lut_sequence_replaces_the_window(tmp_path):
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", list(range(4095 * 16, -1, -16)))  # a falling ramp: the LUT decides
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.save_as(tmp_path / "voi.dcm")
    decoded = dicom.frames(tmp_path / "voi.dcm")[0]
    values = np.clip(ds.pixel_array.astype(np.int64), 0, 4095)
    expected = (4095 * 16 - values * 16) / (4095 * 16)
    assert np.abs(decoded - expected).max() < 1e-6


def test_deflated_transfer_syntax():
    image = dicom.frames(shipped("image_dfl.dcm"))
    assert image.shape == (1, 512, 512) and image.std() > 0.1


def test_a_file_without_preamble_or_file_meta(tmp_path):
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    ds.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True)
    assert (tmp_path / "bare.dcm").read_bytes()[128:132] != b"DICM"
    assert np.array_equal(dicom.frames(tmp_path / "bare.dcm"), dicom.frames(shipped("MR_small.dcm")))


def test_missing_plugin_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(DataError, match=r"MR_small_jp2klossless\.dcm: .*pip install pylibjpeg pylibjpeg-openjpeg"):
        dicom.frames(shipped("MR_small_jp2klossless.dcm"))


def test_objects_that_are_not_images_say_what_they_are():
    with pytest.raises(DataError, match=r"liver\.dcm: a DICOM SEG"):
        dicom.frames(DATA / "liver.dcm")
    with pytest.raises(DataError, match=r"rtplan\.dcm: no pixel data: a RT Plan Storage object"):
        dicom.frames(shipped("rtplan.dcm"))
    with pytest.raises(DataError, match=r"too_short\.dcm: no pixel data element"):
        dicom.frames(DATA / "emri_small_jpeg_2k_lossless_too_short.dcm")
    with pytest.raises(DataError, match=r"MR_truncated\.dcm: cannot decode the pixel data"):
        dicom.frames(shipped("MR_truncated.dcm"))


def test_header_checks_refuse_before_decoding():
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    with pytest.raises(DataError, match="too large to decode"):
        pixels.check(ds)
