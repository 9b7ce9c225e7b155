"""What a site runs: an app bundle's site-side code held against the code the hospital installed.

In deployment the coordinator sends every hospital a Flower app bundle (FAB) and Flower's
clientapp process would import the ClientApp from it: the coordinator's code, on the
hospital's images. A site runs only what its hospital approved: the code it installed
itself (the bundle is used only as a version check: its site-side files must equal the
installed ones, and then the installed copy is imported), or a bundle whose digest the
hospital approved after reading it (`fedhosp client --allow-app SHA256`).
fedhosp/approved_code.py enforces this in the clientapp process; this module only judges.

The digest is over the bundle's files as installed (path and content, `__pycache__` left out),
not Flower's FAB hash: Flower names a bundle's folder after 8 hex digits of that hash only,
and what matters is the code that would run.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SITE_PACKAGES = ("client", "common")  # what runs at a site and touches its data
CLIENTAPP = "client.app:app"  # the ClientApp a site runs (pyproject.toml's [tool.flwr.app.components])
PYPROJECT = "pyproject.toml"
INSTALLED, APPROVED, REFUSED = "installed", "approved", "refused"


@dataclass(frozen=True)
class Verdict:
    """One bundle judged: run the installed code, run the approved bundle, or refuse."""

    bundle: Path
    sha256: str
    decision: str
    differs: tuple[str, ...] = ()

    @property
    def runs(self) -> bool:
        return self.decision != REFUSED

    def line(self) -> str:
        """The site's log line for this bundle (what a hospital's engineer reads)."""
        if self.decision == INSTALLED:
            return (f"fedhosp: app bundle {self.bundle.name} matches this site's installed code; running the "
                    "installed copy")
        if self.decision == APPROVED:
            return (f"fedhosp: app bundle {self.bundle.name} (sha256 {self.sha256}) is approved by --allow-app; "
                    "running it")
        shown = ", ".join(self.differs[:8]) + (f" and {len(self.differs) - 8} more" if len(self.differs) > 8 else "")
        return (f"fedhosp: refused app bundle {self.bundle.name} (sha256 {self.sha256}): its site-side code differs "
                f"from this site's installed fedhosp ({shown}). Review it in {self.bundle} and approve it with "
                f"`fedhosp client --allow-app {self.sha256}`, or install the coordinator's fedhosp version")

    def record(self) -> dict[str, object]:
        """The audit line's values (client/audit.py): nothing here leaves the site."""
        return {"app-decision": self.decision, "app-sha256": self.sha256, "app-bundle": self.bundle.name,
                **({"app-differs": list(self.differs)} if self.differs else {})}


def files(folder: Path, under: Iterable[str] = ("",)) -> dict[str, str]:
    """A bundle's (or source tree's) files by relative path -> SHA-256, bytecode caches left out;
    `under`: only these subfolders."""
    out: dict[str, str] = {}
    for path in sorted(p for sub in under for p in (folder / sub).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file():
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def digest(folder: Path) -> str:
    """One SHA-256 over a bundle's files: what a hospital approves."""
    total = hashlib.sha256()
    for rel, sha in files(folder).items():
        total.update(rel.encode() + b"\0" + sha.encode() + b"\n")
    return total.hexdigest()


def clientapp_ref(folder: Path) -> str:
    """The ClientApp a bundle names in its pyproject.toml ("" when it names none)."""
    try:
        config = tomllib.loads((folder / PYPROJECT).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return ""
    return str(config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp", ""))


def differences(bundle: Path, installed: Path, packages: Iterable[str] = SITE_PACKAGES) -> list[str]:
    """Where a bundle's site-side code is not the installed code, one phrase per path."""
    def site_side(folder: Path) -> dict[str, str]:
        return {rel: sha for rel, sha in files(folder, tuple(packages)).items() if rel.endswith(".py")}

    ours, theirs = site_side(installed), site_side(bundle)
    out = [f"{rel} changed" for rel in sorted(ours.keys() & theirs.keys()) if ours[rel] != theirs[rel]]
    out += [f"{rel} only in the bundle" for rel in sorted(theirs.keys() - ours.keys())]
    out += [f"{rel} missing from the bundle" for rel in sorted(ours.keys() - theirs.keys())]
    if (sent := clientapp_ref(bundle)) != CLIENTAPP:
        out.insert(0, f"clientapp {sent!r} instead of {CLIENTAPP!r}")
    return out


def judge(bundle: Path, installed: Path, approved: Iterable[str] = ()) -> Verdict:
    """Run the installed copy when the bundle's site-side code equals it; the bundle itself only when
    the hospital approved its digest; otherwise refuse."""
    sha = digest(bundle)
    if sha in {a.lower() for a in approved}:
        return Verdict(bundle, sha, APPROVED)
    differs = tuple(differences(bundle, installed))
    return Verdict(bundle, sha, REFUSED if differs else INSTALLED, differs)


_current: Verdict | None = None


def current() -> Verdict | None:
    """The verdict on the bundle this process was started for (set by the site's guard), if any."""
    return _current


def set_current(verdict: Verdict) -> None:
    global _current
    _current = verdict
