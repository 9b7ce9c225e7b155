"""Run `fedhosp simulate` with a spy on the server's receive path; dump every reply a site sent.

Usage: python capture_run.py OUT.json SIMULATE-ARGS...  (run as a subprocess: Ray stays out of pytest)
The spy sits where the server receives (`server.app._send`), so it sees exactly what left each site.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

import server.app as server_app
from fedhosp.cli import main


def describe(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"type": msg.metadata.message_type, "node": msg.metadata.src_node_id,
                           "error": msg.error.reason if msg.has_error() else None, "records": {}}
    if msg.has_error():
        return out
    for name, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            arrays = {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in record.items()}
            out["records"][name] = {"kind": "arrays", "items": arrays}
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
    receive = server_app._send

    def spy(grid, messages, cfg):
        replies = receive(grid, messages, cfg)
        captured.extend(describe(m) for m in replies)
        return replies

    server_app._send = spy
    try:
        return main(argv)
    finally:
        with open(dump, "w") as f:
            json.dump(captured, f)


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1], sys.argv[2:]))
