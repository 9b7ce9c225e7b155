"""From physical values to grey in [0, 1]: the VOI step of a viewer, and per-modality presets.

A window is what makes a CT readable: 4,000 HU squeezed into 256 grey levels shows
nothing, brain at 40/80 shows a stroke. `auto` follows what the scanner or the
radiologist saved (a VOI LUT, else Window Center/Width); a file with neither gets its
modality's default preset (CT: soft tissue) or, for units with no fixed meaning (MR,
US), the 1st-99th percentile of its own values. A named preset applies only to the
modality it is defined for (HU presets to CT); other files still get `auto`. The
maths is pydicom's (LINEAR, LINEAR_EXACT and SIGMOID as the standard defines them).
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import apply_voi, apply_windowing

from common.errors import ConfigError

# (center, width) in the modality's physical units; CT in Hounsfield units.
PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "CT": {
        "brain": (40, 80),
        "subdural": (75, 215),
        "stroke": (32, 8),
        "soft-tissue": (40, 400),
        "mediastinum": (50, 350),
        "liver": (30, 150),
        "lung": (-600, 1500),
        "bone": (400, 1800),
    },
}
DEFAULT_PRESET = {"CT": "soft-tissue"}
MODES = ("auto", "file", "percentile")
PERCENTILES = (1.0, 99.0)


def names() -> tuple[str, ...]:
    return MODES + tuple(sorted({p for presets in PRESETS.values() for p in presets}))


def check(window: str) -> str:
    if window not in names():
        raise ConfigError(f"window {window!r} is unknown: use one of {', '.join(names())}")
    return window


def to_grey(values: np.ndarray, ds: pydicom.Dataset, window: str = "auto") -> np.ndarray:
    """`values` after the modality LUT -> float32 in [0, 1], before any MONOCHROME1 inversion."""
    modality = str(ds.get("Modality", ""))
    presets = PRESETS.get(modality, {})
    if window in presets:
        return linear(values, *presets[window])
    if window != "percentile":
        saved = _saved_window(values, ds)
        if saved is not None:
            return saved
        if window == "auto" and modality in DEFAULT_PRESET:
            return linear(values, *presets[DEFAULT_PRESET[modality]])
    return percentile(values)


def linear(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """pydicom's windowing into [0, 1] (a one-bit output range makes it return [0, 1] directly)."""
    view = pydicom.Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored, view.PixelRepresentation = 1, 0
    view.WindowCenter, view.WindowWidth, view.VOILUTFunction = float(center), float(width), function
    return _unit(apply_windowing(values, view))


def percentile(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    low, high = (float(v) for v in np.percentile(finite, PERCENTILES))
    if high <= low:
        high = low + 1.0
    return linear(values, (low + high) / 2, high - low, "LINEAR_EXACT")


def _saved_window(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The file's own VOI LUT, else its first Window Center/Width; None when it has no usable one."""
    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") and lut[0].get("LUTData") is not None:
        return _voi_lut(values, ds)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
    width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if function == "LINEAR" and ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds):
        function = "LINEAR_EXACT"  # LINEAR's -0.5 / -1 corrections are for integer pixels
    try:
        return linear(values, float(center), float(width), function)
    except (ValueError, TypeError):  # width < 1, an unknown function, a non-numeric value: not usable
        return None


def _voi_lut(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The VOI LUT maps integer inputs; its output is scaled by the LUT's own range."""
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first = int(descriptor[0]) or 2**16, int(descriptor[1])
    table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds).astype(np.float64)
    low, high = float(table.min()), float(table.max())
    mapped = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
    return _unit((mapped - low) / max(high - low, 1.0))


def _unit(values: np.ndarray) -> np.ndarray:
    """float32 in [0, 1], NaN (float pixel data) as 0; in place on the fresh array pydicom returned."""
    values = np.nan_to_num(values, copy=False, nan=0.0)
    return np.clip(values, 0.0, 1.0, out=values).astype(np.float32)
