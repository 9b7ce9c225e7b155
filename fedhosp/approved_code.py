"""The site runs only code it approved: every clientapp task behind an import guard.

Flower's clientapp process installs the app bundle the coordinator sent into the site's
Flower home (`apps/<publisher>.<name>.<version>.<hash prefix>`), puts that folder first on
`sys.path` and imports the ClientApp the bundle's pyproject names. `fedhosp client` starts
every task (through the warm zygote, fedhosp/warm_clientapp.py, or this module's `main`)
with `Guard` first on `sys.meta_path`, installed by the site's own code before Flower reads
the bundle. Every top-level import that would be taken from a bundle folder is judged
once per bundle (common/app_bundle.py):
- the bundle's site-side code equals the installed code: `client`/`common` are imported
  from the hospital's installation, anything else the bundle holds is refused;
- the hospital approved the bundle's digest (`--allow-app`): the bundle's code runs;
- otherwise the import fails with the refusal (Flower sends the server an error reply
  carrying it), and the site's log and audit trail name the bundle and its digest.
The guard writes its audit line itself, so the record never depends on the bundle's code.
A standard `importlib` meta path finder: nothing of Flower's is patched.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

from common import app_bundle
from common.flower_compat import clientapp as flower_clientapp
from common.site_state import SiteState

AUDIT_LOG = "audit.jsonl"  # client/audit.py's file, in the site's state folder


class RefusedApp(ImportError):
    """The coordinator's app bundle is not what this site approved to run."""


class Guard(importlib.abc.MetaPathFinder):
    """Judge each bundle the first time an import would come from it; serve the verdict."""

    def __init__(self, flower_home: Path, state: SiteState | None, approved: Sequence[str] = (),
                 bundles: ModuleType = app_bundle) -> None:
        self.apps = (flower_home / flower_clientapp.APPS).resolve()
        self.bundles = bundles  # the common.app_bundle the ClientApp will import: it reads the verdict there
        self.state = state
        self.approved = tuple(a.lower() for a in approved)
        self.installed = {name: _installed(name) for name in app_bundle.SITE_PACKAGES}
        self.verdicts: dict[Path, app_bundle.Verdict] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if path is not None:  # a submodule: its package's own folder decides, and the package was judged
            return None
        found = importlib.machinery.PathFinder.find_spec(fullname, sys.path)
        bundle = self._bundle_of(found)
        if bundle is None:
            return None
        verdict = self.verdict(bundle)
        if verdict.decision == app_bundle.APPROVED:
            return None  # the bundle's own file, as Flower would have imported it
        if verdict.decision == app_bundle.INSTALLED and fullname in self.installed:
            return self.installed[fullname]
        if verdict.decision == app_bundle.INSTALLED:
            raise RefusedApp(f"fedhosp: refused to import {fullname!r} from app bundle {bundle.name}: the site runs "
                             "its installed code and nothing else from a bundle")
        raise RefusedApp(verdict.line())

    def verdict(self, bundle: Path) -> app_bundle.Verdict:
        if bundle not in self.verdicts:
            root = Path(self.installed["client"].origin or "").resolve().parents[1]
            verdict = self.bundles.judge(bundle, root, self.approved)
            self.verdicts[bundle] = verdict
            self.bundles.set_current(verdict)
            if verdict.decision == app_bundle.APPROVED:
                _forget(app_bundle.SITE_PACKAGES)  # the approved bundle's code, whole: no installed copy mixed in
            print(verdict.line(), file=sys.stderr, flush=True)
            self._audit(verdict)
        return self.verdicts[bundle]

    def _bundle_of(self, spec: ModuleSpec | None) -> Path | None:
        if spec is None:
            return None
        places = [spec.origin or "", *(spec.submodule_search_locations or [])]
        for place in places:
            resolved = Path(place).resolve() if place else None
            if resolved is not None and resolved.is_relative_to(self.apps) and resolved != self.apps:
                return self.apps / resolved.relative_to(self.apps).parts[0]
        return None

    def _audit(self, verdict: app_bundle.Verdict) -> None:
        if self.state is None:
            return
        import datetime
        import json

        run_id, node_id = flower_clientapp.task_identity()
        line = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "run-id": str(run_id),
                "node-id": node_id, "event": "app", "round": None, **verdict.record()}
        self.state.append_line(AUDIT_LOG, json.dumps(line))


def _installed(name: str) -> ModuleSpec:
    """Where this site's own copy of a package is (found before any bundle is on sys.path)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"fedhosp's {name!r} package is not installed here")
    origin = Path(spec.origin)
    fresh = importlib.util.spec_from_file_location(name, origin, submodule_search_locations=[str(origin.parent)])
    assert fresh is not None
    return fresh


def _forget(packages: Sequence[str]) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[name]


def install(flower_home: Path, state: SiteState | None, approved: Sequence[str] = ()) -> Guard:
    """Put the guard first on sys.meta_path, before Flower reads any bundle. `client` is forgotten so
    that the ClientApp's first import is judged; `common` is imported here, from this site's copy, so
    that the verdict can be recorded where the ClientApp's audit reads it."""
    _forget(("client",))
    bundles = importlib.import_module(app_bundle.__name__)
    guard = Guard(flower_home, state, approved, bundles)
    sys.meta_path.insert(0, guard)
    return guard


def arguments(flower_home: Path, state: Path, approved: Sequence[str]) -> list[str]:
    """The guard's settings on a command line (the zygote's and `main`'s), as `fedhosp client` passes them."""
    allowed = [a for sha in approved for a in ("--allow-app", sha)]
    return ["--flower-home", str(flower_home), "--state", str(state), *allowed]


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(prog="python -m fedhosp.approved_code", add_help=False)
    out.add_argument("--flower-home", type=Path, required=True)
    out.add_argument("--state", type=Path, required=True)
    out.add_argument("--allow-app", action="append", default=[], metavar="SHA256")
    return out


def install_from(args: argparse.Namespace) -> Guard:
    return install(args.flower_home, SiteState(args.state), args.allow_app)


def main(argv: Sequence[str] | None = None) -> None:
    """Flower's `flwr-clientapp` behind the guard: `python -m fedhosp.approved_code GUARD... -- FLOWER...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    install_from(parser().parse_args(args[:split]))
    sys.argv = [flower_clientapp.COMMAND, *args[split + 1:]]
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name=flower_clientapp.COMMAND)
    sys.exit(entry.load()())


if __name__ == "__main__":
    main()
