"""Synthetic hospitals written as real DICOM: chest-radiograph-like images, some with a lesion.

The positive class carries a faint, blurred opacity of random size, contrast and
position inside a lung field, under per-site noise: learnable, but a share of the
lesions is too faint to see, so a good centralized model lands near 90%, not 100%.
Sites differ in intensity scale and offset (and so rescale and window), noise,
prevalence, size and photometric interpretation. Everything is a pure function of
the seed, so `fedhosp synth` is reproducible byte for byte.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter

from common.config import site_name
from common.data.sources import MANIFEST, MASK_MANIFEST
from common.errors import ConfigError

FORMAT = 3  # bump when the generator changes what it writes
STORED_SIZE = 128
BITS_STORED = 12
MAX_ATTENUATION = 1.2
MASK_DIR = "masks"


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital's scanner and population differ from the others."""

    index: int
    num_images: int
    prevalence: float
    noise: float  # std of additive noise, in units of the tissue contrast range
    scale: float  # physical units per unit attenuation
    offset: float  # physical value of air
    slope: float  # DICOM RescaleSlope
    photometric: str  # MONOCHROME2, or MONOCHROME1 (inverted grey scale)
    lesion_contrast: tuple[float, float] = (0.03, 0.45)  # from invisible to obvious

    @property
    def intercept(self) -> float:
        """RescaleIntercept: chosen so stored values are non-negative and fit BitsStored."""
        return self.offset - 0.1 * self.scale


def site_profiles(num_sites: int, images_per_site: int, seed: int,
                  lesion_contrast: tuple[float, float] = (0.03, 0.45)) -> list[SiteProfile]:
    if num_sites < 1:
        raise ConfigError(f"--sites = {num_sites}: a federation needs at least 1 site")
    if images_per_site < 10:
        raise ConfigError(f"--images-per-site = {images_per_site}: use at least 10")
    rng = np.random.default_rng([seed, 7919])
    profiles = []
    for i in range(num_sites):
        slope = float(rng.choice([0.5, 1.0]))
        profiles.append(
            SiteProfile(
                index=i,
                num_images=int(images_per_site * rng.uniform(0.7, 1.3)),
                prevalence=float(rng.uniform(0.4, 0.6)),
                noise=float(rng.uniform(0.025, 0.05)),
                scale=float(rng.uniform(800, 2600 * slope)),
                offset=float(rng.uniform(-1000, 0)),
                slope=slope,
                photometric="MONOCHROME1" if i % 4 == 3 else "MONOCHROME2",
                lesion_contrast=lesion_contrast,
            )
        )
    return profiles


def render(rng: np.random.Generator, positive: bool, noise: float,
           lesion_contrast: tuple[float, float] = (0.03, 0.45)) -> tuple[np.ndarray, np.ndarray]:
    """One image of attenuation in [0, MAX_ATTENUATION] and its lesion mask (empty when negative)."""
    n = STORED_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    cx, cy = 0.5 + rng.normal(0, 0.02), 0.52 + rng.normal(0, 0.02)
    body = _ellipse(xx, yy, cx, cy, 0.42 * rng.uniform(0.92, 1.05), 0.47)
    img = 0.05 + 0.55 * body
    lungs = np.zeros_like(img, dtype=bool)
    for side in (-1, 1):
        lx = cx + side * rng.uniform(0.17, 0.2)
        lung = _ellipse(xx, yy, lx, cy - 0.02, rng.uniform(0.12, 0.15), rng.uniform(0.28, 0.33))
        lungs |= lung
    img = np.where(lungs, 0.22, img)
    ribs = np.maximum(0, np.sin(2 * np.pi * (yy * rng.uniform(7, 9) + 3 * (xx - cx) ** 2)))
    img += lungs * 0.07 * ribs**4
    img += 0.15 * _ellipse(xx, yy, cx, cy + 0.1, 0.06, 0.4)  # mediastinum
    texture = gaussian_filter(rng.normal(0, 1, (n, n)), sigma=n / 24)
    img += 0.04 * texture / (np.abs(texture).max() + 1e-6)
    mask = np.zeros((n, n), dtype=np.uint8)
    if positive:
        lesion, mask = _lesion(rng, lungs, xx, yy, lesion_contrast)
        img += lesion
    img = gaussian_filter(img, sigma=0.8) + rng.normal(0, noise, (n, n))
    return np.clip(img, 0.0, MAX_ATTENUATION).astype(np.float32), mask


def _ellipse(xx, yy, cx, cy, rx, ry):
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _lesion(rng, lungs, xx, yy, contrast_range):
    """A nodule: a disc with a soft edge; its contrast runs from invisible to obvious."""
    ys, xs = np.nonzero(lungs)
    k = rng.integers(len(ys))
    cy, cx = ys[k] / STORED_SIZE, xs[k] / STORED_SIZE
    radius = rng.uniform(0.08, 0.18)
    contrast = rng.uniform(*contrast_range)
    distance = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / radius
    blob = contrast / (1.0 + np.exp((distance - 1.0) / 0.15))
    return blob, (distance <= 1.0).astype(np.uint8)


def to_physical(attenuation: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """Scanner values. A MONOCHROME1 scanner writes dense tissue as low values (shown white)."""
    if profile.photometric == "MONOCHROME1":
        attenuation = MAX_ATTENUATION - attenuation
    return profile.offset + profile.scale * attenuation


def to_stored(physical: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """Invert the modality LUT into BitsStored integers."""
    stored = np.rint((physical - profile.intercept) / profile.slope)
    return np.clip(stored, 0, 2**BITS_STORED - 1).astype(np.uint16)


def window(profile: SiteProfile) -> tuple[float, float]:
    """(center, width) showing attenuation [-0.05, 1.15] on every site, whatever its scanner."""
    middle = 0.55 if profile.photometric == "MONOCHROME2" else MAX_ATTENUATION - 0.55
    return profile.offset + middle * profile.scale, 1.2 * profile.scale


def display(attenuation: np.ndarray) -> np.ndarray:
    """What a correct decoder shows for `attenuation`, on any site (the tests' reference)."""
    return np.clip((attenuation + 0.05) / 1.2, 0.0, 1.0)


def image(profile: SiteProfile, seed: int, idx: int) -> tuple[np.ndarray, int, np.ndarray]:
    """The attenuation image, label and lesion mask of one file: a pure function of its indices."""
    rng = np.random.default_rng([seed, profile.index, idx])
    label = int(rng.random() < profile.prevalence)
    attenuation, mask = render(rng, bool(label), profile.noise, profile.lesion_contrast)
    return attenuation, label, mask


def write_hospitals(out: Path, num_sites: int, seed: int, images_per_site: int = 500,
                    lesion_contrast: tuple[float, float] = (0.03, 0.45)) -> list[Path]:
    """Write `num_sites` hospital folders of DICOM + labels.csv under `out`; return their paths.

    A narrower, higher `lesion_contrast` makes an easy task: for tests that compare strategies
    over a few short rounds rather than measure how well a model learns.
    """
    paths = []
    for profile in site_profiles(num_sites, images_per_site, seed, lesion_contrast):
        folder = Path(out) / site_name(profile.index)
        write_site(folder, profile, seed)
        paths.append(folder)
    return paths


def write_site(folder: Path, profile: SiteProfile, seed: int) -> None:
    """DICOM images, `labels.csv` (file,label) and, for segmentation, PNG masks + `masks.csv`."""
    (folder / MASK_DIR).mkdir(parents=True, exist_ok=True)
    labels, masks = [], []
    for idx in range(profile.num_images):
        attenuation, label, mask = image(profile, seed, idx)
        name = f"img_{idx:05d}.dcm"
        _dataset(to_stored(to_physical(attenuation, profile), profile), profile, seed, idx).save_as(
            folder / name, enforce_file_format=True
        )
        mask_name = f"{MASK_DIR}/img_{idx:05d}.png"
        Image.fromarray(mask).save(folder / mask_name)
        labels.append((name, label))
        masks.append((name, mask_name))
    _write_csv(folder / MANIFEST, ("file", "label"), labels)
    _write_csv(folder / MASK_MANIFEST, ("file", "mask"), masks)


def _write_csv(path: Path, header: tuple[str, str], rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def fake_identifiers(site: int, seed: int, idx: int) -> dict[str, str]:
    """Recognisable fake patient identifiers, as a real archive's headers hold real ones.

    They let the leakage test prove that nothing from a header ever leaves a site.
    """
    day = dt.date(2020, 1, 1) + dt.timedelta(days=(seed * 31 + idx) % 1500)
    born = dt.date(1940, 1, 1) + dt.timedelta(days=(site * 7919 + idx * 104729) % 25000)
    tag = f"{site:03d}{idx:06d}"
    return {
        "PatientID": f"SYN{tag}",
        "PatientName": f"Synthetic^Patient{tag}",
        "PatientBirthDate": born.strftime("%Y%m%d"),
        "PatientSex": "OF"[idx % 2],
        "AccessionNumber": f"ACC{tag}",
        "StudyID": f"ST{tag}",
        "StudyDate": day.strftime("%Y%m%d"),
        "StudyTime": f"{8 + idx % 10:02d}{idx % 60:02d}00",
        "InstitutionName": f"Synthetic General Hospital {site:03d}",
        "ReferringPhysicianName": f"Fake^Referrer{tag}",
        "OperatorsName": f"Fake^Operator{site:03d}",
    }


def _dataset(stored: np.ndarray, profile: SiteProfile, seed: int, idx: int) -> Dataset:
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=[kind, str(seed), str(profile.index), str(idx)])

    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = f"fedhosp-synthetic-{profile.index}"
    for keyword, value in fake_identifiers(profile.index, seed, idx).items():
        setattr(ds, keyword, value)
    ds.SeriesNumber = 1
    ds.InstanceNumber = idx + 1
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{profile.slope:g}"
    ds.RescaleIntercept = f"{profile.intercept:.4f}"
    ds.RescaleType = "US"
    center, width = window(profile)
    ds.WindowCenter = f"{center:.2f}"
    ds.WindowWidth = f"{width:.2f}"
    ds.PixelData = stored.tobytes()
    return ds
