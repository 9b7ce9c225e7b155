"""requirements.lock is the tree every install uses, and it says what pyproject.toml says.

pyproject keeps the ranges a library user needs; `make lock` (pip-compile) resolves them into
exact, hash-pinned versions. A dependency added to or dropped from pyproject without `make lock`,
or a pin outside pyproject's range, fails here rather than in a fresh clone's install.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _lock() -> dict[str, dict]:
    """name -> {version, hashes, via}: pip-compile's blocks (a pin line, its hashes, its `# via` lines)."""
    pins: dict[str, dict] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        if match := PIN.match(line):
            current = pins.setdefault(canonicalize_name(match.group(1)),
                                      {"version": match.group(2), "hashes": 0, "via": []})
        elif current is not None and line.startswith("    --hash=sha256:"):
            current["hashes"] += 1
        elif current is not None and line.strip().startswith("#") and line.startswith("    "):
            current["via"].append(line.strip("# ").removeprefix("via").strip())
        elif line and not line.startswith(" "):
            current = None
    return pins


def _direct() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_direct_dependency_is_locked_inside_its_range():
    pins = _lock()
    for req in _direct():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name]["version"], prereleases=True), \
            f"requirements.lock pins {req.name}=={pins[name]['version']}, outside pyproject's {req}: run `make lock`"


def test_the_lock_holds_nothing_pyproject_no_longer_asks_for():
    direct = {canonicalize_name(r.name) for r in _direct()}
    from_pyproject = {name for name, pin in _lock().items()
                      if any(v.startswith("fedhosp (pyproject.toml)") for v in pin["via"])}
    assert from_pyproject == direct, "pyproject.toml and requirements.lock disagree: run `make lock`"


def test_every_pin_is_exact_and_hashed():
    pins = _lock()
    assert len(pins) > 100  # the whole tree, not only the direct dependencies
    unhashed = sorted(name for name, pin in pins.items() if not pin["hashes"])
    assert not unhashed, unhashed
    for tool in ("pip", "setuptools", "wheel"):  # what installs and builds is locked too
        assert tool in pins, tool


def test_every_install_path_installs_the_lock_with_hashes():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps --no-build-isolation -r $(LOCK)" in makefile
    assert "$(STAMP): pyproject.toml $(LOCK)" in makefile  # a changed lock reinstalls
    for target in ("demo", "test", "bench", "lint"):
        assert re.search(rf"^{target}: \$\(STAMP\)", makefile, re.M), target
    for dockerfile in sorted((ROOT / "docker").glob("Dockerfile.*")):
        text = dockerfile.read_text()
        assert re.search(r"^COPY [^\n]*requirements\.lock", text, re.M) and "--require-hashes" in text, dockerfile.name
        assert re.search(r"pip install[^\n]*--no-deps[^\n]*-e \.", text), dockerfile.name
