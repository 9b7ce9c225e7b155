"""Run `fedhosp simulate --engine inprocess` with a spy on the wire; dump every reply a site sent.

Usage: python capture_run.py OUT.json SIMULATE-ARGS...  (run as a subprocess, as a researcher runs it)
The spy sits at the bottom of the server's grid stack, on the engine's own grid (below PackedGrid,
server/assembly.py), so it sees each reply exactly as it crossed the wire a hospital uses: every
ArrayRecord is recorded as it travelled (`packed`) and described as it unpacks.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from common.flower_compat import packing
from fedhosp.cli import main
from simulation.clientapp import PARTITION_QUERY
from simulation.inprocess import InProcessGrid


def describe(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"type": msg.metadata.message_type, "node": msg.metadata.src_node_id,
                           "error": msg.error.reason if msg.has_error() else None, "records": {}}
    if msg.has_error():
        return out
    for name, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            arrays = {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in packing.unpack(record).items()}
            out["records"][name] = {"kind": "arrays", "items": arrays, "packed": packing.is_packed(record)}
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            out["records"][name] = {"kind": kind, "items": {k: _plain(v) for k, v in record.items()}}
        else:
            out["records"][name] = {"kind": type(record).__name__, "items": repr(record)}
    return out


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else repr(value)


def run(dump: str, argv: list[str]) -> int:
    captured: list[dict[str, Any]] = []
    receive = InProcessGrid.pull_messages

    def spy(grid, message_ids):
        replies = receive(grid, message_ids)
        captured.extend(describe(m) for m in replies if m.metadata.message_type != PARTITION_QUERY)
        return replies

    InProcessGrid.pull_messages = spy
    try:
        return main(argv)
    finally:
        with open(dump, "w") as f:
            json.dump(captured, f)


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1], sys.argv[2:]))
