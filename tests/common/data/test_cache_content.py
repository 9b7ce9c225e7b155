"""The decode cache is keyed by what files contain: copies hit it, edits miss it, deleting it is safe."""

import os
import shutil

import numpy as np

from common.data import cache, digests, sources
from common.data.decode import decode_example


def _load(root, cache_dir, calls):
    def decode(example):
        calls.append(example.path.name)
        return decode_example(example, 32)

    return cache.load_or_decode(sources.load(root), root, cache_dir, {"size": 32}, decode)


def _site(hospitals, tmp_path, name="site"):
    root = tmp_path / name
    shutil.copytree(hospitals / "site-000", root)
    return root


def test_a_copied_archive_with_new_dates_hits_the_cache(hospitals, tmp_path):
    root, calls = _site(hospitals, tmp_path), []
    first = _load(root, tmp_path / "cache", calls)
    copy = tmp_path / "restored"
    shutil.copytree(root, copy)  # new inodes, new mtimes and ctimes: same bytes
    for path in copy.iterdir():
        os.utime(path, (1e9, 1e9))
    decoded = calls.copy()
    second = _load(copy, tmp_path / "cache", calls)
    assert calls == decoded  # nothing decoded again
    assert second.names == first.names and np.array_equal(second.images, first.images)


def test_an_edit_that_keeps_size_and_mtime_is_still_seen(hospitals, tmp_path):
    root, calls = _site(hospitals, tmp_path), []
    first = _load(root, tmp_path / "cache", calls)
    target = root / first.names[0]
    data, stat = bytearray(target.read_bytes()), target.stat()
    data[-10:] = bytes(10)  # the last pixels go black: same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old modification time
    n = len(calls)
    second = _load(root, tmp_path / "cache", calls)
    assert len(calls) - n == len(first.names)  # a different archive: decoded afresh
    assert not np.array_equal(second.images[0], first.images[0])


def test_the_cache_is_safe_to_delete(hospitals, tmp_path):
    root, calls = _site(hospitals, tmp_path), []
    first = _load(root, tmp_path / "cache", calls)
    shutil.rmtree(tmp_path / "cache")
    digests.forget()
    second = _load(root, tmp_path / "cache", calls)
    assert len(calls) == 2 * len(first.names)
    assert second.names == first.names and np.array_equal(second.images, first.images)


def test_a_new_process_reuses_saved_digests_instead_of_rehashing(hospitals, tmp_path):
    root, calls = _site(hospitals, tmp_path), []
    _load(root, tmp_path / "cache", calls)
    assert (tmp_path / "cache" / cache.DIGESTS).is_file()
    digests.forget()  # what a fresh process knows
    hashed = digests.hashed
    _load(root, tmp_path / "cache", calls)
    assert digests.hashed == hashed  # witnesses from the site's cache folder: no file read again
    assert len(calls) == len(sources.load(root))


def test_each_site_has_its_own_cache_folder(hospitals, tmp_path):
    calls = []
    _load(hospitals / "site-000", tmp_path / "a", calls)
    _load(hospitals / "site-001", tmp_path / "b", calls)
    a = {p.name for p in (tmp_path / "a").iterdir()}
    b = {p.name for p in (tmp_path / "b").iterdir()}
    assert not {n for n in a & b if n.startswith("decoded-")}
    saved = (tmp_path / "a" / cache.DIGESTS).read_text()
    assert str(hospitals / "site-000") in saved and str(hospitals / "site-001") not in saved
