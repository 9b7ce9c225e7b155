"""sources.load: one dispatcher over every layout a hospital may have, and the split it implies."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from common.data import cache, sources, split
from common.data.decode import decode_example
from common.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "data"
BREASTMNIST = Path(__file__).resolve().parents[4] / "shared" / "data" / "breastmnist"


def _decode(examples, root, cache_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cache.load_or_decode(examples, root, cache_dir, {"size": 16}, lambda e: decode_example(e, 16))


def _png(path: Path, value: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_a_manifest_folder_loads_as_before(hospitals):
    assert sources.load(hospitals / "site-000") == sources.dicom_folder(hospitals / "site-000")


def test_class_sub_folders_are_labelled_by_name(tmp_path):
    for i in range(3):
        _png(tmp_path / "malignant" / f"m{i}.png", 200)
        _png(tmp_path / "benign" / "deep" / f"b{i}.png", 50)
    (tmp_path / "notes.txt").write_text("not an image")
    examples = sources.load(tmp_path)
    assert {(e.path.parent.name, e.label) for e in examples} == {("deep", 0), ("malignant", 1)}
    decoded = _decode(examples, tmp_path, tmp_path.parent / "cache")
    assert len(decoded.names) == 6 and decoded.targets.tolist().count(1) == 3


def test_class_folders_named_by_index_keep_their_index(tmp_path):
    _png(tmp_path / "2" / "a.png", 10)
    _png(tmp_path / "7" / "b.png", 10)
    assert sorted(e.label for e in sources.load(tmp_path)) == [2, 7]


def test_png_folder_with_manifest_and_16_bit_depth(tmp_path):
    values = np.linspace(0, 65535, 16 * 16, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    _png(tmp_path / "flat.png", 255, size=16)
    (tmp_path / "labels.csv").write_text("file,label\ndeep.png,1\nflat.png,0\n")
    decoded = _decode(sources.load(tmp_path), tmp_path, tmp_path / "cache")
    deep = decoded.images[decoded.names.index("deep.png")].astype(np.float32)
    assert np.allclose(deep, values / 65535, atol=1e-3)  # 16-bit precision, not clipped to 8 bits
    assert np.allclose(decoded.images[decoded.names.index("flat.png")], 1.0)


def _npz(path: Path, splits=("train", "val", "test"), sizes=(6, 3, 2)) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for name, n in zip(splits, sizes, strict=True):
        arrays[f"{name}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{name}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(path, **arrays)


def test_npz_keeps_its_splits_and_leaves_test_out(tmp_path):
    _npz(tmp_path / "site.npz")
    examples = sources.load(tmp_path)
    assert [e.split for e in examples] == ["train"] * 6 + ["val"] * 3
    decoded = _decode(examples, tmp_path, tmp_path / "cache")
    with np.load(tmp_path / "site.npz") as z:
        assert np.allclose(decoded.images[7].astype(np.float32),
                           decode_example(examples[7], 16)[0], atol=1e-3)
        assert decoded.names[7] == "site.npz:val_images#1" and decoded.targets[7] == z["val_labels"][1, 0]
    held = split.held_out(decoded, 0.5, seed=0)
    assert held.tolist() == [False] * 6 + [True] * 3  # the archive's split, not the site's hash


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros(3)}, "not a MedMNIST-style archive"),
    ({"train_images": np.zeros((2, 4, 4)), "train_labels": np.zeros((2, 14), dtype=int)}, "multi-label"),
    ({"train_images": np.zeros((3, 4, 4)), "train_labels": np.zeros(2, dtype=int)}, "holds 3 images but"),
    ({"train_images": np.zeros((2, 5, 5, 5)), "train_labels": np.zeros(2, dtype=int)}, "only 2D images"),
])
def test_bad_npz_archives_name_the_problem(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        sources.load(tmp_path)


@pytest.mark.skipif(not BREASTMNIST.is_dir(), reason="shared/data is not beside this checkout")
def test_real_breastmnist_archive():
    examples = sources.load(BREASTMNIST)
    train = [e for e in examples if e.split == "train"]
    assert len(train) == 546 and len(examples) == 546 + 78
    assert sum(e.label == 0 for e in train) == 147
    image, label = decode_example(train[0], 28)
    assert image.shape == (28, 28) and 0 <= image.min() < image.max() <= 1 and label in (0, 1)


def _series(folder: Path, slices: int) -> str:
    """A real MR slice copied into a new series of `slices` slices; returns its Series Instance UID."""
    series, study = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for i in range(slices):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID = series, study, generate_uid()
        ds.save_as(folder / f"slice{i}.dcm")
    return series


def test_labels_per_series_label_every_slice_and_keep_them_together(tmp_path):
    first, second = _series(tmp_path / "a", 3), _series(tmp_path / "b", 4)
    _series(tmp_path / "unlabelled", 2)
    (tmp_path / "labels.csv").write_text(f"series,label\n{first},1\n{second},0\n")
    examples = sources.load(tmp_path)
    assert sorted((e.path.parent.name, e.label) for e in examples) == [("a", 1)] * 3 + [("b", 0)] * 4
    decoded = _decode(examples, tmp_path, tmp_path / "cache")
    for fraction in (0.3, 0.5, 0.7):
        held = split.held_out(decoded, fraction, seed=1)
        for folder in ("a", "b"):
            sides = {bool(h) for h, n in zip(held, decoded.names, strict=True) if n.startswith(folder)}
            assert len(sides) == 1  # every slice of a series on the same side


def test_labels_per_study_and_unknown_uids(tmp_path):
    _series(tmp_path / "a", 2)
    study = str(pydicom.dcmread(tmp_path / "a" / "slice0.dcm").StudyInstanceUID)
    (tmp_path / "labels.csv").write_text(f"study,label\n{study},1\n")
    assert [e.label for e in sources.load(tmp_path)] == [1, 1]
    (tmp_path / "labels.csv").write_text(f"study,label\n{study},1\n1.2.3.4.5,0\n")
    with pytest.raises(DataError, match=r"labels\.csv line\(s\) 3: no readable DICOM file .* belongs to that study"):
        sources.load(tmp_path)


def test_a_manifest_row_may_name_a_series_folder(tmp_path):
    _series(tmp_path / "series1", 3)
    (tmp_path / "labels.csv").write_text("file,label\nseries1,1\n")
    examples = sources.load(tmp_path)
    assert len(examples) == 3 and {e.label for e in examples} == {1} and len({e.group for e in examples}) == 1


def test_every_frame_of_a_multi_frame_file_is_an_example_on_one_side(tmp_path):
    shutil.copy(DATA / "emri_small.dcm", tmp_path / "cine.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm", download=False), tmp_path / "single.dcm")
    (tmp_path / "labels.csv").write_text("file,label\ncine.dcm,1\nsingle.dcm,0\n")
    decoded = _decode(sources.load(tmp_path), tmp_path, tmp_path / "cache")
    assert decoded.names == (*(f"cine.dcm#{k}" for k in range(10)), "single.dcm")
    assert decoded.targets.tolist() == [1] * 10 + [0]
    for fraction in (0.3, 0.6):
        assert len(set(split.held_out(decoded, fraction, seed=2)[:10].tolist())) == 1


def test_nothing_fits_names_the_folder_and_the_layouts(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=rf"{tmp_path} holds none of the layouts fedhosp reads: add labels\.csv"):
        sources.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        sources.load(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        sources.load(tmp_path / "absent")


def test_two_archives_or_an_archive_for_segmentation_are_refused(tmp_path):
    _npz(tmp_path / "a.npz")
    with pytest.raises(DataError, match=r"segmentation needs masks\.csv"):
        sources.load(tmp_path, "segmentation")
    _npz(tmp_path / "b.npz")
    with pytest.raises(DataError, match=r"holds 2 \.npz files \(a\.npz, b\.npz\): keep one archive per site folder"):
        sources.load(tmp_path)
