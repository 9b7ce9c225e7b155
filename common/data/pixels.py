"""Stored pixel values out of a DICOM dataset, through pydicom's decoders and their plugins.

A hospital archive holds every encoding its scanners ever wrote. pydicom decodes the
native ones itself and the compressed ones through plugins (pylibjpeg and friends, or
GDCM); when none is installed the error names the package to install. The header is
checked first, so a corrupt Rows/Columns is refused before anything is allocated.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from common.errors import DataError

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MAX_VALUES = 2**30  # samples in one file; beyond this the header is wrong, or the file is not for a 2D model
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg pylibjpeg-openjpeg"
# Transfer syntax -> the PyPI packages that decode it (python-gdcm decodes them all).
PLUGINS = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG, "1.2.840.10008.1.2.4.51": _LIBJPEG,
    "1.2.840.10008.1.2.4.57": _LIBJPEG, "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": _LIBJPEG, "1.2.840.10008.1.2.4.81": _LIBJPEG,
    "1.2.840.10008.1.2.4.90": _OPENJPEG, "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _OPENJPEG, "1.2.840.10008.1.2.4.202": _OPENJPEG,
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


def transfer_syntax(ds: pydicom.Dataset) -> UID:
    meta = ds.get("file_meta")
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        raise DataError("the file meta has no Transfer Syntax UID: re-export the file from the PACS")
    return UID(str(uid))


def number_of_frames(ds: pydicom.Dataset) -> int:
    value = ds.get("NumberOfFrames") or 1
    frames = int(value)
    if frames < 1:
        raise DataError(f"NumberOfFrames is {frames}: the header is corrupt")
    return frames


def check(ds: pydicom.Dataset) -> None:
    """Refuse what cannot be a 2D image before decoding: every reason is one line for the site's report."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        meta = ds.get("file_meta") or {}
        kind = UID(str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")).name
        if kind and "Image" not in kind:
            raise DataError(f"no pixel data: a {kind} object, not an image")
        raise DataError(f"no pixel data element{f' in this {kind}' if kind else ''}: is the file truncated?")
    if ds.get("Modality") == "SEG":
        raise DataError("a DICOM SEG (segmentation) object: list it as a mask in masks.csv, not as an image")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 1 or columns < 1:
        raise DataError(f"Rows x Columns is {rows} x {columns}: the header is corrupt")
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples not in (1, 3):
        raise DataError(f"SamplesPerPixel is {samples}: only grey (1) and colour (3) images are supported")
    allocated = int(ds.get("BitsAllocated") or 0)
    if allocated not in (1, 8, 16, 32, 64):
        raise DataError(f"BitsAllocated is {allocated}: the header is corrupt (1, 8, 16, 32 or 64)")
    stored = ds.get("BitsStored")
    if stored is not None and not 1 <= int(stored) <= allocated:
        raise DataError(f"BitsStored {int(stored)} does not fit BitsAllocated {allocated}: the header is corrupt")
    values = rows * columns * samples * number_of_frames(ds)
    if values > MAX_VALUES:
        raise DataError(f"{rows} x {columns} x {samples} x {number_of_frames(ds)} frames is too large to decode: "
                        "the header is corrupt, or the file is not a 2D image")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in PHOTOMETRICS:
        raise DataError(f"photometric interpretation {photometric!r} is not supported")


def decode(ds: pydicom.Dataset, index: int | None = None) -> tuple[np.ndarray, str]:
    """Frames as (F, rows, columns[, 3]) and the photometric they are in (YBR comes back as RGB)."""
    uid = transfer_syntax(ds)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DataError(
            f"pixel data is {uid.name or uid}, which pydicom {pydicom.__version__} cannot decode: "
            "convert the file to an uncompressed transfer syntax (e.g. dcmtk's dcmconv +te)"
        ) from None
    if not decoder.is_available:
        raise DataError(missing_plugin(uid))
    if index is not None and not 0 <= index < number_of_frames(ds):
        raise DataError(f"frame {index} does not exist: the file has {number_of_frames(ds)} frame(s)")
    if decoder.is_native:
        _check_length(ds)
    try:
        array, meta = decoder.as_array(ds, index=index)
    except StopIteration:  # an encapsulated frame that is not there
        raise DataError(f"the pixel data holds fewer frames than NumberOfFrames ({number_of_frames(ds)})") from None
    frames = 1 if index is not None else number_of_frames(ds)
    if array.ndim == 2 + (int(ds.get("SamplesPerPixel") or 1) > 1):  # one frame comes without a frame axis
        array = array[None]
    if len(array) != frames:
        raise DataError(f"the pixel data holds {len(array)} frames but the header says {frames}: "
                        "Rows, Columns, BitsAllocated or NumberOfFrames is wrong")
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    return array, photometric


def _check_length(ds: pydicom.Dataset) -> None:
    """Native pixel data far longer than its header describes means a wrong header: decoding
    it anyway would cut it into thousands of meaningless frames (pydicom tolerates excess)."""
    keyword = next(k for k in PIXEL_KEYWORDS if k in ds)
    actual, expected = len(ds[keyword].value), get_expected_length(ds)
    if actual > 2 * expected + 2:
        raise DataError(f"the pixel data is {actual} bytes but Rows x Columns x frames x BitsAllocated describe "
                        f"{expected}: the header is corrupt")


def missing_plugin(uid: UID) -> str:
    packages = PLUGINS.get(str(uid), "python-gdcm")
    return (f"pixel data is {uid.name or uid}, and no decoder plugin for it is installed: "
            f"pip install {packages} (or python-gdcm)")
