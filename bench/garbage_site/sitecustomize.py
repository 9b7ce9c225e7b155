"""bench/load.py's garbage site: every reply malformed, from a ClientApp that stands in for client.app's.

Only the load benchmark puts this folder on one site's PYTHONPATH (its own `fedhosp client`'s
environment): Python imports `sitecustomize` at start-up in every process of that site, and this one
makes the module `client.app` export a different `app` once it has run. Nothing a coordinator sends
can switch it on, and client/ is untouched. The stand-in answers every train and evaluate message with
a reply that breaks the reply schema in a different way each round (wrong arrays, wrong metrics,
nothing), without training: what the coordinator must reject, round after round, without stopping.
"""

from __future__ import annotations

import importlib.abc
import sys

TARGET = "client.app"


def garbage_app():
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def reply(msg: Message) -> Message:
        rounds = [int(r["server-round"]) for r in msg.content.config_records.values() if "server-round" in r]
        server_round = rounds[0] if rounds else 1
        kind = server_round % 3
        if kind == 1:  # arrays of names and shapes no model has
            content = RecordDict({"arrays": ArrayRecord({"junk": Array(np.full(7, 3.0, dtype=np.float32))}),
                                  "metrics": MetricRecord({"num-examples": 10})})
        elif kind == 2:  # metrics out of range, an unknown record
            content = RecordDict({"metrics": MetricRecord({"num-examples": -5, "train-loss": float("inf")}),
                                  "surprise": ConfigRecord({"path": "/etc/passwd"})})
        else:  # nothing at all
            content = RecordDict({})
        print(f"garbage site: round {server_round}: malformed {msg.metadata.message_type} reply", flush=True)
        return Message(content=content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: object) -> Message:
        return reply(msg)

    @app.evaluate()
    def evaluate(msg: Message, context: object) -> Message:
        return reply(msg)

    return app


class _SwapApp(importlib.abc.MetaPathFinder):
    """Find client.app as the other finders would, and replace its `app` right after it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    module.app = garbage_app()

                spec.loader.exec_module = exec_module
                return spec
        return None


sys.meta_path.insert(0, _SwapApp())
