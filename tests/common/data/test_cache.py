import shutil

import numpy as np

from common.data import cache, sources
from common.data.decode import decode_example


def _counting_decoder(calls):
    def decode(example):
        calls.append(example.path.name)
        return decode_example(example, 32)

    return decode


def test_second_load_decodes_nothing(hospitals, tmp_path):
    root = hospitals / "site-000"
    examples = sources.dicom_folder(root)
    calls = []
    first = cache.load_or_decode(examples, root, tmp_path, {"size": 32}, _counting_decoder(calls))
    assert len(calls) == len(examples)
    second = cache.load_or_decode(examples, root, tmp_path, {"size": 32}, _counting_decoder(calls))
    assert len(calls) == len(examples)  # no new decode
    assert np.array_equal(first.images, second.images) and first.names == second.names
    cache.load_or_decode(examples, root, tmp_path, {"size": 16}, _counting_decoder(calls))
    assert len(calls) == 2 * len(examples)  # other settings: decoded afresh


def test_corrupt_file_is_skipped_and_reported(hospitals, tmp_path):
    root = tmp_path / "site"
    shutil.copytree(hospitals / "site-000", root)
    (root / "img_00002.dcm").write_bytes(b"not a dicom file at all")
    examples = sources.dicom_folder(root)
    decoded = cache.load_or_decode(examples, root, tmp_path / "cache", {"size": 32},
                                   lambda e: decode_example(e, 32))
    assert len(decoded.images) == len(examples) - 1
    assert [name for name, _ in decoded.skipped] == ["img_00002.dcm"]
    assert "not a readable DICOM file" in decoded.skipped[0][1]
    assert "img_00002.dcm" not in decoded.names
