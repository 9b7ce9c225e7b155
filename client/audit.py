"""The site's audit trail: on the hospital's own disk, one JSON line per message its node answered.

A hospital must be able to show, without asking the coordinator, every federated run its
data took part in, which code ran on it and how much privacy each run spent. Flower starts
a fresh ClientApp process per message, so each answer appends one line (append-only, flushed
and fsynced) to `audit.jsonl` in the site's state folder; `summary` folds the lines into one
record per run. The app is identified by a SHA-256 over the site-side code that actually
ran and, in deployment, by the digest of the bundle the coordinator sent. There the site's
import guard (fedhosp/approved_code.py)
writes its own line (`event: app`) before any ClientApp code runs, with the bundle's digest
and its verdict; every later line of that process carries them too. Nothing here is ever sent.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from common import app_bundle
from common.site_state import SiteState

AUDIT_LOG = "audit.jsonl"
CODE_PACKAGES = app_bundle.SITE_PACKAGES  # what runs at the site and touches its data


def record(state: SiteState | Path, run_id: str, node_id: int, event: str, server_round: int,
           values: Mapping[str, Any] | None = None) -> None:
    """Append one line: which run, which round, what the site did (train, evaluate, refused)."""
    line = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "run-id": run_id,
            "node-id": node_id, "event": event, "round": server_round, **app_identity(), **(values or {})}
    SiteState.at(state).append_line(AUDIT_LOG, json.dumps(line, default=str))


def read(state: SiteState | Path) -> list[dict[str, Any]]:
    text = SiteState.at(state).read_text(AUDIT_LOG) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def summary(state: SiteState | Path) -> list[dict[str, Any]]:
    """One record per run, in order of first appearance: rounds trained, ε spent, app seen."""
    runs: dict[str, dict[str, Any]] = {}
    for line in read(state):
        run = runs.setdefault(line["run-id"], {"run-id": line["run-id"], "first": line["time"], "rounds": [],
                                               "evaluations": 0, "refused": 0, "epsilon": None,
                                               "epsilon-total": None, "app": ""})
        run["last"] = line["time"]
        run["app"] = (line.get("app-sha256") or line.get("code-sha256", ""))[:16]
        if line.get("app-decision") == app_bundle.REFUSED:
            run["refused"] += 1
        if line["event"] == "train":
            run["rounds"].append(line["round"])
            for key in ("epsilon", "epsilon-total"):
                if key in line:
                    run[key] = line[key]
        elif line["event"] == "evaluate":
            run["evaluations"] += 1
        elif line["event"] == "refused":
            run["refused"] += 1
    return list(runs.values())


@cache
def app_identity() -> dict[str, str]:
    """A hash of the site-side code that runs, and the guard's verdict on the coordinator's bundle."""
    identity = {"code-sha256": _code_hash(Path(__file__).resolve().parents[1])}
    if (verdict := app_bundle.current()) is not None:
        identity.update({"app-sha256": verdict.sha256, "app-decision": verdict.decision})
    return identity


def _code_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
