"""Flower's environment, in one place: every process that runs Flower, ours or one we start, gets it.

Hospitals are often air-gapped: no telemetry and no update check. The processes `fedhosp server`
and `fedhosp client` start (fedhosp/processes.py) also get the deployment settings below.
`apply` is for processes that run Flower themselves (the `fedhosp` command, pytest): it is called
before Flower is imported, and what the user set in the environment wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from common.flower_compat.environment import without_internal

QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
DEPLOYMENT = {
    **QUIET,
    # Without it the SuperLink `uv sync`s our dependencies (torch: gigabytes) before every run.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # SuperExec looks for a new task every second by default: up to 1 s idle before each message's
    # clientapp starts (twice a round). A local HTTP call five times a second costs nothing.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """No telemetry, no update check in this process, unless the user's environment says otherwise."""
    for key, value in QUIET.items():
        environ.setdefault(key, value)


def command_env(home: Path, extra: Mapping[str, str] | None = None,
                environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a Flower command we start: its own FLWR_HOME, the deployment settings, this
    interpreter's bin first on PATH (Flower's commands live beside it), and none of Flower's internal
    toggles (common/flower_compat/environment.py), whoever set them."""
    env = {**without_internal(environ), **DEPLOYMENT, "FLWR_HOME": str(home), **without_internal(extra or {})}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
