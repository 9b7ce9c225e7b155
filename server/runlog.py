"""The run log: one JSON line per finished round, appended and flushed as the round ends.

A run that ends early (every site's budget spent) also logs why, as an `event` line:
`read` gives the finished rounds, `events` the rest. Non-finite numbers (a refusal's
`epsilon-next` = inf from a site with a budget in a run without DP) are stored as null:
strict JSON has no inf, and a log line must never fail to be written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server import durable

RUN_LOG = "runlog.jsonl"


def start(path: Path) -> None:
    rewrite(path, [])


def rewrite(path: Path, records: list[Mapping[str, Any]]) -> None:
    """The log holding exactly `records`, replaced whole (resume trims it to the checkpoint's round)."""
    text = "".join(json.dumps(finite(r), allow_nan=False) + "\n" for r in records)
    durable.replace(path, lambda f: f.write(text.encode()))


def append(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(finite(record), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finite(value: Any) -> Any:
    """`value` with every NaN or inf, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def event(path: Path, kind: str, record: Mapping[str, Any]) -> None:
    append(path, {"event": kind, **record})


def read(path: Path) -> list[dict[str, Any]]:
    """The finished rounds."""
    return [r for r in _lines(path) if "event" not in r]


def events(path: Path) -> list[dict[str, Any]]:
    return [r for r in _lines(path) if "event" in r]


def _lines(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
