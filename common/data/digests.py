"""Content digests of a site's files, hashed again only when a file has changed.

The decode cache is keyed by what files contain, not by their names or dates: a
restored or copied archive hits the cache, an edited file misses it. Hashing every
file every round would cost as much as a cached load itself, so a digest is kept
with the file's stat witness (device, inode, size, mtime, ctime): the kernel moves
ctime on every write and no tool can set it back, so an unchanged witness means
unchanged bytes. Witnesses live in memory and in the site's cache folder; deleting
them only costs one re-hash.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from common.site_state import SiteState

CHUNK = 1 << 20
_KNOWN: dict[str, tuple[list[int], str]] = {}  # absolute path -> (witness, sha256)
hashed = 0  # files hashed by this process: lets callers tell whether the store needs saving


def digest(path: Path) -> str:
    """sha256 of the file's bytes."""
    global hashed
    key = os.path.abspath(path)
    st = os.stat(key)
    witness = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    known = _KNOWN.get(key)
    if known is not None and known[0] == witness:
        return known[1]
    h = hashlib.sha256()
    with open(key, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    _KNOWN[key] = (witness, h.hexdigest())
    hashed += 1
    return _KNOWN[key][1]


def load(state: SiteState, name: str) -> None:
    """Merge witnesses saved by an earlier process; a missing or damaged store is ignored."""
    try:
        saved = state.read_json(name) or {}
        _KNOWN.update({k: (list(v[0]), str(v[1])) for k, v in saved.items() if k not in _KNOWN})
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return


def save(state: SiteState, name: str, paths: Iterable[Path]) -> None:
    """Write the witnesses of `paths` (this site's files only) atomically."""
    entries = {k: _KNOWN[k] for k in (os.path.abspath(p) for p in paths) if k in _KNOWN}
    state.write_json(name, entries)


def forget() -> None:
    """Drop the in-memory witnesses (what a new process starts with)."""
    _KNOWN.clear()
