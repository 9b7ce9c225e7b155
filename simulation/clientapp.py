"""The ClientApp virtual hospitals run: the real sites' handlers, plus one simulation-only query.

Flower's engine gives every virtual node a random id per run and tells only the node its
partition id. `query.partition` lets the simulation's server side (simulation/grid.py) learn
which node plays which partition, so it can sample, order and report sites by partition:
runs repeat exactly. Under Ray the answer also names the Ray node it ran on, so a run on a
cluster can show where its sites went. A real hospital runs `client.app.app`, which has no such query.
"""

from __future__ import annotations

import sys

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import app as site_app

PARTITION_QUERY = "query.partition"
PARTITION_KEY = "partition-id"
RAY_NODE_KEY = "ray-node"
RAY_GPUS_KEY = "ray-gpus"

app = ClientApp()
app.train()(site_app.train)
app.evaluate()(site_app.evaluate)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    answer: dict[str, int | str | list[str]] = {PARTITION_KEY: int(context.node_config[PARTITION_KEY])}
    if (node := ray_node()) is not None:
        answer[RAY_NODE_KEY], answer[RAY_GPUS_KEY] = node
    return Message(RecordDict({"partition": ConfigRecord(answer)}), reply_to=msg)


def ray_node() -> tuple[str, list[str]] | None:
    """The Ray node this process runs on and the GPUs Ray gave it (what device=auto trains on: Ray
    shows the process only those); None outside Ray (in-process engine: Ray is never imported)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    return context.get_node_id(), [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
