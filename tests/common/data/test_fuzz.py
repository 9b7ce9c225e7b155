"""Hundreds of damaged real DICOM files: none may crash decoding, each is reported with its reason,
and the good files beside them still load.

Every variant is a deterministic edit of a real file (pydicom's test data): truncated, bytes
flipped, PixelData removed, absurd Rows/Columns, inconsistent BitsAllocated, a damaged
sequence, a lying NumberOfFrames, photometric or transfer syntax.
"""

import csv
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_file

from common.data import cache, masks, sources
from common.data.decode import decode_example
from common.data.example import Example
from common.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "data"
BASES = {
    "mr": get_testdata_file("MR_small.dcm", download=False),
    "ct": get_testdata_file("CT_small.dcm", download=False),
    "rle": get_testdata_file("MR_small_RLE.dcm", download=False),
    "j2k": get_testdata_file("MR_small_jp2klossless.dcm", download=False),
    "jls": get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False),
    "multiframe": str(DATA / "emri_small.dcm"),
}
SIZE = 32


@contextmanager
def _lenient_writing() -> Iterator[None]:
    """Let pydicom write the invalid values a damaged file holds."""
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = old


def _edited(base: str, edit: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(base)
    edit(ds)
    out = BytesIO()
    with _lenient_writing():
        ds.save_as(out)
    return out.getvalue()


def _set(**values) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in values.items():
            if keyword == "TransferSyntaxUID":
                ds.file_meta.TransferSyntaxUID = value
            elif value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return edit


def _with_sequence(ds: pydicom.Dataset) -> None:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
    ds.ReferencedImageSequence = pydicom.Sequence([item, item])


SQ_TAG = b"\x08\x00\x40\x11SQ\x00\x00"  # (0008,1140) Referenced Image Sequence, explicit VR little endian


def _bad_sequences(base: str, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    data = bytearray(_edited(base, _with_sequence))
    at = data.find(SQ_TAG)
    if at < 0:
        return
    length = at + len(SQ_TAG)
    for name, value in (("huge", b"\xf0\xff\xff\x7f"), ("short", b"\x0a\x00\x00\x00"),
                        ("odd", b"\x03\x00\x00\x00"), ("undefined", b"\xff\xff\xff\xff")):
        bad = bytearray(data)
        bad[length:length + 4] = value
        yield f"sequence-length-{name}", bytes(bad)
    bad = bytearray(data)
    bad[length + 4:length + 8] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()  # the item tag itself
    yield "sequence-item-tag", bytes(bad)


def variants(name: str, base: str) -> Iterator[tuple[str, bytes]]:
    rng = np.random.default_rng(sum(map(ord, name)))
    raw = Path(base).read_bytes()
    for fraction in (0.01, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.99):
        yield f"truncated-{fraction}", raw[: int(len(raw) * fraction)]
    for k, flips in enumerate((1, 1, 2, 4, 8, 16, 64, 256)):
        data = bytearray(raw)
        for at in rng.integers(0, len(raw), flips):
            data[at] ^= 0xFF
        yield f"flipped-{k}-{flips}", bytes(data)
    yield "no-pixel-data", _edited(base, _set(PixelData=None))
    for rows, columns in ((0, 0), (1, 1), (65535, 65535), (512, 64), (64, 1)):
        yield f"rows-{rows}-columns-{columns}", _edited(base, _set(Rows=rows, Columns=columns))
    for allocated, stored in ((8, 8), (12, 12), (32, 32), (0, 0), (64, 16), (16, 20)):
        yield f"bits-{allocated}-{stored}", _edited(base, _set(BitsAllocated=allocated, BitsStored=stored))
    yield from ((f"{n}", data) for n, data in _bad_sequences(base, rng))
    for frames in ("0", "-3", "100000", "2"):
        yield f"frames-{frames}", _edited(base, _set(NumberOfFrames=frames))
    for photometric, samples in (("RGB", 1), ("FOO", 1), ("MONOCHROME2", 3)):
        yield f"photometric-{photometric}-{samples}", _edited(
            base, _set(PhotometricInterpretation=photometric, SamplesPerPixel=samples))
    yield "syntax-lie", _syntax_lie(raw)


# What each file's transfer syntax is replaced by, byte for byte (same length): data it does not describe.
LIES = {b"1.2.840.10008.1.2.1\x00": b"1.2.840.10008.1.2.5\x00",  # native data declared RLE
        b"1.2.840.10008.1.2.5\x00": b"1.2.840.10008.1.2.1\x00",  # RLE declared native
        b"1.2.840.10008.1.2.4.90": b"1.2.840.10008.1.2.4.80",  # JPEG 2000 declared JPEG-LS
        b"1.2.840.10008.1.2.4.80": b"1.2.840.10008.1.2.4.70"}  # JPEG-LS declared JPEG lossless


def _syntax_lie(raw: bytes) -> bytes:
    syntax = str(pydicom.dcmread(BytesIO(raw), stop_before_pixels=True).file_meta.TransferSyntaxUID).encode()
    truth = next(t for t in LIES if t.rstrip(b"\x00") == syntax)
    return raw.replace(truth, LIES[truth], 1)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("damaged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, base in BASES.items():
            shutil.copy(base, folder / f"good-{name}.dcm")
            for variant, data in variants(name, base):
                (folder / f"{name}-{variant}.dcm").write_bytes(data)
    return folder


def test_there_are_at_least_200_variants(damaged):
    assert len(list(damaged.glob("*.dcm"))) - len(BASES) >= 200


def test_no_damaged_file_crashes_the_decoder(damaged):
    reported = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(damaged.glob("*.dcm")):
            try:
                image, _ = decode_example(Example(path), SIZE)
            except DataError as exc:
                assert str(exc).startswith(f"{path.name}: ") and len(str(exc)) > len(path.name) + 10, str(exc)
                reported += 1
                continue
            assert image.shape[-2:] == (SIZE, SIZE) and np.isfinite(image).all(), path.name
            assert image.min() >= 0 and image.max() <= 1, path.name
    assert reported >= 150  # most damage must be caught, not decoded into noise


REASONS = {
    "truncated-0.01": "not a readable DICOM file|no pixel data element",
    "truncated-0.05": "no pixel data element|pixel data is less than expected",
    "truncated-0.5": "no pixel data element|pixel data is less than expected",
    "no-pixel-data": "no pixel data element",
    "rows-65535-columns-65535": "too large to decode",
    "rows-1-columns-1": "the header is corrupt",
    "bits-0-0": "BitsAllocated is 0",
    "bits-8-8": "the pixel data holds (2|20) frames but the header says (1|10)",
    "bits-16-20": "BitsStored 20 does not fit BitsAllocated 16",
    "frames--3": "NumberOfFrames is -3",
    "frames-100000": "cannot decode the pixel data|too large to decode",
    "photometric-FOO-1": "photometric interpretation 'FOO' is not supported",
    "sequence-length-huge": "cannot decode the pixel data|no pixel data element|not a readable DICOM file",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_each_kind_of_damage_is_reported_with_its_reason(damaged, kind):
    reasons = REASONS
    for name in ("mr", "multiframe"):
        with pytest.raises(DataError, match=reasons[kind]):
            decode_example(Example(damaged / f"{name}-{kind}.dcm"), SIZE)


def test_good_files_still_load_beside_the_damaged_ones(damaged, tmp_path):
    files = sorted(p.name for p in damaged.glob("*.dcm"))
    with open(damaged / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows([name, i % 2] for i, name in enumerate(files))
    examples = sources.load(damaged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = cache.load_or_decode(examples, damaged, tmp_path / "cache", {"size": SIZE},
                                       lambda e: decode_example(e, SIZE))
    loaded = {name.split("#")[0] for name in decoded.names}
    skipped = dict(decoded.skipped)
    assert {f"good-{name}.dcm" for name in BASES} <= loaded
    assert loaded | set(skipped) == set(files) and not loaded & set(skipped)
    assert all(reason for reason in skipped.values())
    assert len(skipped) >= 150
    assert sum(n.startswith("good-multiframe.dcm#") for n in decoded.names) == 10


def test_a_seg_mask_no_decoder_can_read_is_reported_not_raised():
    """liver_rle.dcm (1-bit RLE SEG) defeats pydicom's and pylibjpeg's RLE decoders with a RuntimeError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"liver_rle\.dcm: not a readable mask \(RuntimeError: Unable to decode"):
            masks.read_mask(DATA / "liver_rle.dcm")
