"""What fedhosp reads from Flower's command-line tools, which have no machine-readable stream.

`fedhosp server` follows `flwr run --stream` for the run id and for our own log lines,
`flwr ls --format json` for the run's status, and `fedhosp client` the SuperNode's output
for a refused key. The words and line shapes below are Flower 1.41's. They are held against the
real processes: tests/fedhosp/test_deployment.py (`flwr run` and `flwr ls` on a real SuperLink:
without the run id the coordinator cannot follow or resume its run) and
tests/fedhosp/test_control_api.py (a real SuperNode with an unregistered key: `SiteRefused`).
"""

from __future__ import annotations

import json
import re
from typing import Any

_STARTED = re.compile(r"Successfully started run (\d+)")
# Flower's own lines in a run's stream: ANSI colour, its timestamp, logging prefixes, tracebacks.
_FLOWER_LINE = re.compile(r"^(\x1b\[|\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:|INFO:|WARNING:|ERROR:|Traceback|\s)")
REFUSED_KEY = "Failed to activate SuperNode"  # the SuperNode's words when the SuperLink does not know its key


def started_run(line: str) -> str | None:
    """The run id in `flwr run`'s "Successfully started run N" line, else None."""
    match = _STARTED.search(line)
    return match.group(1) if match else None


def is_flower_line(line: str) -> bool:
    return bool(_FLOWER_LINE.match(line))


def listed_runs(stdout: str) -> list[dict[str, Any]]:
    """The runs in `flwr ls --format json`'s output (which may print other lines before the JSON)."""
    try:
        return list(json.loads(stdout[stdout.index("{"):])["runs"])
    except (ValueError, KeyError):
        return []
