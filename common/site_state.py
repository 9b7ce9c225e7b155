"""The one owner of a hospital site's state folder: every file under it is opened here and nowhere else.

The folder holds patient-derived data at rest (decoded images, model state, the DP secret, the
privacy ledger), so it and every folder in it is the site user's alone (0700) and every file too
(0600), whatever the umask, and a folder found wider is tightened. Every file is replaced
atomically (a temp file in the same folder, fsynced, renamed over, the folder fsynced): a crash
leaves the old content or the new, never half, which for the ledger and the secret is the
difference between a budget that holds and one silently reset. Other modules only name files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from common.errors import SiteStateError

if TYPE_CHECKING:
    import numpy as np

    from common.config import SiteConfig

FOLDER_MODE = 0o700
FILE_MODE = 0o600
SECRET_FILE = "site-secret"
SECRET_BYTES = 32


@dataclass(frozen=True)
class SiteState:
    """A site's state folder (`root`), or a folder in it (`prefix`): made private on first write."""

    root: Path
    prefix: PurePosixPath = field(default=PurePosixPath())

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, site: SiteConfig) -> SiteState:
        return cls(Path(site.state_dir))

    @classmethod
    def at(cls, where: SiteState | str | os.PathLike[str]) -> SiteState:
        """Callers outside a site (tools, tests, simulation pools) still pass a plain folder."""
        return where if isinstance(where, SiteState) else cls(Path(where))

    # names

    @property
    def path(self) -> Path:
        """This folder's path (not created: for messages and for naming it to other programs)."""
        return self.root / self.prefix

    def path_for(self, name: str) -> Path:
        """The path of `name` in this folder; a name that would leave the folder is refused."""
        return self.root / self._relative(name)

    def subfolder(self, name: str) -> SiteState:
        return replace(self, prefix=self._relative(name))

    def folder(self) -> Path:
        """This folder, created and tightened, for a library that needs a directory of its own."""
        self._ensure(self.prefix)
        return self.path

    def exists(self, name: str) -> bool:
        return self.path_for(name).is_file()

    @staticmethod
    def run_name(kind: str, run_id: str, suffix: str = ".pt") -> str:
        """`<kind>-<run id>`: a run id is the server's text, so only safe characters reach a file name."""
        return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)}{suffix}"

    # writes

    def write_bytes(self, name: str, data: bytes) -> None:
        self._atomic(name, lambda f: f.write(data))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, data: Any, indent: int | None = None) -> None:
        self.write_text(name, json.dumps(data, indent=indent))

    def save_tensors(self, name: str, obj: Any) -> None:
        import torch

        self._atomic(name, lambda f: torch.save(obj, f))

    def save_npz(self, name: str, **arrays: np.ndarray) -> None:
        import numpy as np

        self._atomic(name, lambda f: np.savez(f, **arrays))

    def append_line(self, name: str, text: str) -> None:
        """Append one line and fsync it: an append-only log that a crash cuts at most mid-line."""
        with self.open_append(name) as f:
            f.write(text.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())

    def open_append(self, name: str) -> IO[str]:
        """A text file opened for appending (0600), for a log another program's output is copied into."""
        path = self._writable(name)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, "a")

    def create_once(self, name: str, data: bytes) -> bool:
        """Write `name` unless it exists (False then): whole, never half, and never over another writer's."""
        path = self._writable(name)
        tmp = self._temp_write(path, lambda f: f.write(data))
        try:
            os.link(tmp, path)  # fails if `name` exists: O_EXCL's guarantee, for a complete file
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
        _fsync_dir(path.parent)
        return True

    def remove(self, name: str) -> bool:
        """Delete `name` (False if it was not there), the folder fsynced: an evicted cache stays gone."""
        path = self.path_for(name)
        try:
            os.remove(path)
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock on `name` (created empty), released on exit or when the process dies."""
        path = self._writable(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # reads: None where the file is missing

    def read_bytes(self, name: str) -> bytes | None:
        return self._read(name, lambda f: f.read())

    def read_text(self, name: str) -> str | None:
        data = self.read_bytes(name)
        return None if data is None else data.decode()

    def read_json(self, name: str) -> Any | None:
        """The parsed file, None if missing; ValueError if it is not JSON (callers decide what that means)."""
        text = self.read_text(name)
        return None if text is None else json.loads(text)

    def load_tensors(self, name: str) -> Any | None:
        """torch.load with weights_only: a state file can hold tensors and plain data, never code."""
        import torch

        return self._read(name, lambda f: torch.load(f, map_location="cpu", weights_only=True))

    def load_npz(self, name: str) -> dict[str, np.ndarray] | None:
        """Every array of the file, read straight from it (a decode cache can be large: no copy in between)."""
        import numpy as np

        def arrays(f: IO[bytes]) -> dict[str, np.ndarray]:
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}

        return self._read(name, arrays)

    def secret(self, name: str = SECRET_FILE) -> bytes:
        """The site's DP secret, created at random on first use; a file of any other length is an error."""
        self.create_once(name, secrets.token_bytes(SECRET_BYTES))
        data = self.read_bytes(name) or b""
        if len(data) != SECRET_BYTES:
            raise SiteStateError(
                f"{self.path_for(name)} holds {len(data)} bytes, not {SECRET_BYTES}: the site's DP secret is "
                "damaged; restore it from backup (deleting it makes a new one, and this site's earlier DP "
                "rounds can no longer be repeated)"
            )
        return data

    # the rules

    def _relative(self, name: str) -> PurePosixPath:
        if not isinstance(name, str) or not name or "\0" in name:
            raise SiteStateError(f"{name!r} is not a file name in the site's state folder {self.path}")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise SiteStateError(f"{name!r} points outside the site's state folder {self.path}")
        return self.prefix / rel

    def _read(self, name: str, read: Callable[[IO[bytes]], Any]) -> Any | None:
        try:
            with open(self.path_for(name), "rb") as f:
                return read(f)
        except FileNotFoundError:
            return None

    def _writable(self, name: str) -> Path:
        """The path of `name`, every folder from the site's root down to it created or tightened to 0700."""
        rel = self._relative(name)
        self._ensure(rel.parent)
        return self.root / rel

    def _ensure(self, rel: PurePosixPath) -> None:
        self.root.parent.mkdir(parents=True, exist_ok=True)  # above the state folder: not the site's to set
        folder = self.root
        _private_folder(folder)
        for part in rel.parts:
            folder = folder / part
            _private_folder(folder)

    def _atomic(self, name: str, write: Callable[[IO[bytes]], object]) -> None:
        path = self._writable(name)
        tmp = self._temp_write(path, write)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.remove(tmp)
            raise
        _fsync_dir(path.parent)

    @staticmethod
    def _temp_write(path: Path, write: Callable[[IO[bytes]], object]) -> str:
        """A complete, fsynced 0600 copy of the new content beside `path` (removed again if writing fails)."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, 0600
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.remove(tmp)
            raise
        return tmp


def _private_folder(folder: Path) -> None:
    try:
        os.mkdir(folder, FOLDER_MODE)
    except FileExistsError:
        if stat.S_IMODE(os.stat(folder).st_mode) == FOLDER_MODE:
            return
    os.chmod(folder, FOLDER_MODE)  # exact, whatever the umask took away or an older version left


def _fsync_dir(folder: Path) -> None:
    """The rename itself reaches the disk: without this a crash can bring back the old name's file."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def outside_secret(path: Path, create: bool) -> bytes | None:
    """A site secret kept outside its state folder (the ledger's HMAC key), so that whoever can rewrite
    the folder cannot re-sign what it holds. Created (`create`) whole and 0600 like the folder's files,
    never over another writer's; its folder is the hospital's, left as it is. None: missing."""
    path = Path(path)
    if create and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = SiteState._temp_write(path, lambda f: f.write(secrets.token_bytes(SECRET_BYTES)))
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.remove(tmp)
        _fsync_dir(path.parent)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != SECRET_BYTES:
        raise SiteStateError(f"{path} holds {len(data)} bytes, not {SECRET_BYTES}: the key is damaged; "
                             "restore it from backup")
    return data
