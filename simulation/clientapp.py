"""The ClientApp virtual hospitals run: the real sites' handlers, plus one simulation-only query.

Flower's engine gives every virtual node a random id per run and tells only the node its
partition id. `query.partition` lets the simulation's server side (simulation/grid.py) learn
which node plays which partition, so it can sample, order and report sites by partition:
runs repeat exactly. A real hospital runs `client.app.app`, which has no such query.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import app as site_app

PARTITION_QUERY = "query.partition"
PARTITION_KEY = "partition-id"

app = ClientApp()
app.train()(site_app.train)
app.evaluate()(site_app.evaluate)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    pid = int(context.node_config[PARTITION_KEY])
    return Message(RecordDict({"partition": ConfigRecord({PARTITION_KEY: pid})}), reply_to=msg)
