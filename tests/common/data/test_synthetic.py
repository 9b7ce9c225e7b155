import csv
import hashlib

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from common.data import synthetic
from common.data.dicom import decode, resize
from common.errors import ConfigError


def _profiles():
    return synthetic.site_profiles(2, 40, seed=3)


def test_files_are_valid_dicom_with_the_required_tags(hospitals):
    ds = pydicom.dcmread(hospitals / "site-000" / "img_00000.dcm")
    for tag in ("Modality", "PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID",
                "SOPInstanceUID", "Rows", "Columns", "BitsStored", "RescaleSlope", "RescaleIntercept",
                "PhotometricInterpretation", "WindowCenter", "WindowWidth"):
        assert tag in ds, tag
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.pixel_array.max() < 2**ds.BitsStored


@pytest.mark.parametrize("site", [0, 1])
def test_pixels_read_back_in_physical_units(hospitals, site):
    profile = _profiles()[site]
    for idx in (0, 7):
        ds = pydicom.dcmread(hospitals / f"site-{site:03d}" / f"img_{idx:05d}.dcm")
        attenuation, _, _ = synthetic.image(profile, 3, idx)
        intended = synthetic.to_physical(attenuation, profile)
        read = apply_modality_lut(ds.pixel_array, ds)
        assert np.abs(read - intended).max() <= profile.slope / 2 + 1e-3  # quantisation only


def test_labels_match_the_generator(hospitals):
    profile = _profiles()[1]
    with open(hospitals / "site-001" / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == profile.num_images
    for row in rows[:10]:
        idx = int(row["file"][4:9])
        assert int(row["label"]) == synthetic.image(profile, 3, idx)[1]


def test_every_photometric_decodes_to_the_same_display():
    """A MONOCHROME1 site (inverted grey scale, its own window) must look like the others."""
    monochrome1 = next(p for p in synthetic.site_profiles(4, 20, seed=5) if p.photometric == "MONOCHROME1")
    attenuation, _, _ = synthetic.image(monochrome1, 5, 0)
    ds = synthetic._dataset(synthetic.to_stored(synthetic.to_physical(attenuation, monochrome1), monochrome1),
                            monochrome1, 5, 0)
    path = "/tmp/fedhosp-mono1-test.dcm"
    ds.save_as(path, enforce_file_format=True)
    decoded = decode(path, 64)
    expected = resize(synthetic.display(attenuation).astype(np.float32), 64)
    assert np.abs(decoded - expected).max() < 0.01


def test_sites_differ_and_positives_carry_a_lesion():
    profiles = synthetic.site_profiles(5, 100, seed=0)
    assert len({round(p.noise, 4) for p in profiles}) == 5
    assert len({round(p.prevalence, 4) for p in profiles}) == 5
    assert len({round(p.scale, 1) for p in profiles}) == 5
    for idx in range(20):
        _, label, mask = synthetic.image(profiles[0], 0, idx)
        assert (mask.sum() > 0) == bool(label)


def test_deterministic_for_a_seed(tmp_path):
    def digest(root):
        h = hashlib.sha256()
        for path in sorted(root.rglob("*")):
            if path.is_file():
                h.update(path.name.encode() + path.read_bytes())
        return h.hexdigest()

    synthetic.write_hospitals(tmp_path / "a", 2, seed=9, images_per_site=12)
    synthetic.write_hospitals(tmp_path / "b", 2, seed=9, images_per_site=12)
    synthetic.write_hospitals(tmp_path / "c", 2, seed=10, images_per_site=12)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="at least 1 site"):
        synthetic.site_profiles(0, 100, seed=0)
