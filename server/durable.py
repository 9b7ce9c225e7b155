"""The coordinator's files replaced whole: checkpoints, strategy state, the run log on resume.

Each is written to a temp file beside it, fsynced, renamed over the old one, and the folder
fsynced: a crash or a power cut leaves the last finished round's file or the new one, never half
of one, and never an old name coming back after the rename was reported done. (A site's files
have their own owner with the same rules and private modes: common/site_state.py.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def replace(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """`path` with the content `write` puts in the file it is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
