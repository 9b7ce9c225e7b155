"""A round asked again is answered with the reply already sent: no second training, no second ε.

A coordinator stopped after sending round r's train message resumes from round r-1's
checkpoint and sends round r again, with the same global weights and settings. A site
that already trained it (its reply may have left the site) would otherwise release a
second DP output for one round of the run and spend ε twice: the run would end above
its target. Sending the same reply again reveals nothing new. So a site keeps its last
DP reply of each run in its state folder and sends it again when the same run asks for
the same round with the same weights and settings; anything else trains as usual.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from client import local_state
from common.config import RunConfig
from common.site_state import SiteState

KIND = "last-reply"
# Settings a resumed coordinator may change that never reach a site's training.
COORDINATOR_ONLY = ("resume", "round-timeout", "site-wait", "min-available-sites")


def key(run_id: str, server_round: int, arrays: ArrayRecord, run: RunConfig) -> str:
    """What makes two train requests the same: run, round, global weights (names, dtypes, shapes, bytes), settings."""
    settings = {k: v for k, v in run.to_mapping().items() if k not in COORDINATOR_ONLY}
    digest = hashlib.sha256(json.dumps([run_id, server_round, settings], sort_keys=True).encode())
    for name in arrays:
        value = arrays[name].numpy()
        digest.update(json.dumps([name, value.dtype.str, list(value.shape)]).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def load(state: SiteState | str | Path, run_id: str, request: str) -> tuple[ArrayRecord, dict[str, Any]] | None:
    """The reply sent for `request` in this run, if it was the last one."""
    stored = SiteState.at(state).load_tensors(local_state.name(KIND, run_id))
    if stored is None or stored.get("request") != request:
        return None
    return ArrayRecord(torch_state_dict=stored["arrays"]), json.loads(stored["metrics"])


def save(state: SiteState | str | Path, run_id: str, request: str, arrays: ArrayRecord,
         metrics: dict[str, Any]) -> None:
    """Before the reply leaves the site (atomic: a crash leaves the previous one or this one)."""
    stored = {"request": request, "arrays": arrays.to_torch_state_dict(), "metrics": json.dumps(metrics)}
    SiteState.at(state).save_tensors(local_state.name(KIND, run_id), stored)
