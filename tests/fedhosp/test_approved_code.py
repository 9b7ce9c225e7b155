"""A site runs only the code its hospital approved, whatever bundle the coordinator sends.

Each case builds a real app bundle with `flwr build`, and a clientapp process installs and loads
it with Flower's own functions (tests/fedhosp/bundle_task.py) behind the site's guard.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client import audit
from common import app_bundle
from fedhosp import approved_code

ROOT = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).parent / "flwr"


def project(tmp_path: Path, name: str = "proj") -> Path:
    """A copy of this fedhosp's app, as a coordinator would submit it."""
    out = tmp_path / name
    for package in ("client", "common", "server"):
        shutil.copytree(ROOT / package, out / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", out)
    return out


def build(folder: Path) -> Path:
    """`flwr build`, as `flwr run` does before it sends the bundle."""
    subprocess.run([str(FLWR), "build", "--app", str(folder)], cwd=folder, check=True, capture_output=True)
    (fab,) = folder.glob("*.fab")
    return fab


def task(tmp_path: Path, fab: Path, *allow: str, guard: bool = True) -> tuple[dict, str]:
    """One clientapp task's bundle steps in a fresh process; its JSON line and its log (stderr)."""
    home, state = tmp_path / "flwr-home", tmp_path / "state"
    args = approved_code.arguments(home, state, allow) if guard else ["--no-guard"]
    done = subprocess.run([sys.executable, "-m", "tests.fedhosp.bundle_task", str(fab), *args], cwd=ROOT,
                          env={**os.environ, "FLWR_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def audit_lines(tmp_path: Path) -> list[dict]:
    return [line for line in audit.read(tmp_path / "state") if line["event"] == "app"]


LEAK = '''

def leaky_train(self, *args, **kwargs):  # a coordinator's change: the first pixel rides along as a metric
    arrays, metrics = _honest_train(self, *args, **kwargs)
    metrics["pixel-0"] = float(self.data()[0].tensors[0].flatten()[0])
    return arrays, metrics


_honest_train, Site.train = Site.train, leaky_train
'''


def tamper(folder: Path) -> None:
    """The app a hostile coordinator pushes: training replies carry pixel values."""
    site = folder / "client" / "site.py"
    site.write_text(site.read_text() + LEAK)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundles")
    same = build(project(base, "same"))
    changed = project(base, "changed")
    tamper(changed)
    other_app = project(base, "other-app")  # site code untouched; the bundle names another ClientApp
    (other_app / "evil.py").write_text("from client.app import app as stolen\n\napp = stolen\n")
    toml = other_app / "pyproject.toml"
    toml.write_text(toml.read_text().replace('clientapp = "client.app:app"', 'clientapp = "evil:app"'))
    return {"same": same, "changed": build(changed), "other-app": build(other_app)}


def test_a_bundle_equal_to_the_installed_code_runs_the_installed_copy(bundles, tmp_path):
    result, log = task(tmp_path, bundles["same"])
    assert result["app"] == "ClientApp" and not result["leaky"]
    assert all(Path(f).is_relative_to(ROOT) and not Path(f).is_relative_to(tmp_path)
               for f in result["modules"].values())  # the hospital's own files, not the bundle's
    assert "matches this site's installed code" in log
    (line,) = audit_lines(tmp_path)
    assert line["app-decision"] == "installed" and line["app-sha256"] == app_bundle.digest(Path(result["bundle"]))


def test_a_bundle_with_other_site_code_is_refused_naming_what_differs_and_its_digest(bundles, tmp_path):
    result, log = task(tmp_path, bundles["changed"])
    digest = app_bundle.digest(Path(result["bundle"]))
    assert "client.app" not in result.get("modules", {})
    assert "refused app bundle" in result["error"] and "client/site.py changed" in result["error"]
    assert f"--allow-app {digest}" in log  # what the hospital needs to review and approve it
    (line,) = audit_lines(tmp_path)
    assert line["app-decision"] == "refused" and line["app-differs"] == ["client/site.py changed"]
    assert audit.summary(tmp_path / "state")[0]["refused"] == 1


def test_without_the_guard_flower_imports_the_coordinators_code(bundles, tmp_path):
    """What the guard prevents: Flower on its own runs the bundle's files."""
    result, _ = task(tmp_path, bundles["changed"], guard=False)
    assert Path(result["modules"]["client.site"]).is_relative_to(tmp_path / "flwr-home") and result["leaky"]


def test_a_bundle_the_hospital_approved_runs_as_sent(bundles, tmp_path):
    first, _ = task(tmp_path / "first", bundles["changed"])
    digest = app_bundle.digest(Path(first["bundle"]))
    result, log = task(tmp_path, bundles["changed"], digest)
    assert all(Path(f).is_relative_to(tmp_path / "flwr-home") for f in result["modules"].values())
    assert result["leaky"]  # what the hospital approved is what runs
    assert "approved by --allow-app" in log
    assert audit_lines(tmp_path)[0]["app-decision"] == "approved"


def test_another_clientapp_is_refused_even_with_the_site_code_unchanged(bundles, tmp_path):
    result, _ = task(tmp_path, bundles["other-app"])
    assert "clientapp 'evil:app' instead of 'client.app:app'" in result["error"]
    assert "evil.py" not in result.get("modules", {})


def test_the_digest_covers_every_file_and_ignores_bytecode(tmp_path):
    folder = project(tmp_path)
    first = app_bundle.digest(folder)
    (folder / "client" / "__pycache__").mkdir()
    (folder / "client" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    assert app_bundle.digest(folder) == first
    (folder / "docs.txt").write_text("x")
    assert app_bundle.digest(folder) != first
    assert app_bundle.differences(folder, ROOT) == []  # a file outside client/ and common/ is not site code
