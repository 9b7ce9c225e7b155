"""The simulation server's view of the grid: sites by partition id, in one canonical order.

Three things make two runs with one seed differ under Flower's engine, and all three are
fixed here, on the simulation side only (server/ and the real sites are untouched):
- node ids are random per run: the grid asks each node its partition id once
  (`query.partition`, simulation/clientapp.py) and lists nodes by partition;
- FedAvg samples with Python's unseeded `random.sample`: the grid seeds `random` from the
  run's seed each time the strategy lists nodes, so the same partitions are sampled;
- replies arrive in completion order, and float sums depend on order: replies are
  handed to the strategy sorted by partition.
It also hands each round's global model to an optional central evaluation (the source's
own test split), since every evaluate message carries that round's global weights. Under Ray,
each node's answer names the Ray node it ran on and the GPUs Ray gave it: `ray-nodes.json` shows
how a run on a cluster spread its sites (Flower's actor pool may run a site's later messages
on another node: any free actor takes the next message).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.config import site_name
from common.grid_layer import GridLayer
from simulation.clientapp import PARTITION_KEY, PARTITION_QUERY, RAY_GPUS_KEY, RAY_NODE_KEY
from simulation.report import NODES

log = logging.getLogger(__name__)
ROUND_KEY = "server-round"
RoundHook = Callable[[int, ArrayRecord], None]
RAY_NODES = "ray-nodes.json"  # site-NNN -> {node, gpus}: where its partition query ran (Ray engine only)


class CanonicalGrid(GridLayer):
    """A Grid that lists, samples and answers in partition order."""

    def __init__(self, grid: Grid, seed: int, out_dir: Path, on_evaluate: RoundHook | None = None,
                 timeout: float = 600.0) -> None:
        super().__init__(grid)
        self.seed, self.out_dir, self.on_evaluate, self.timeout = seed, Path(out_dir), on_evaluate, timeout
        self.partition: dict[int, int] = {}
        self.ray_node: dict[int, dict[str, Any]] = {}  # partition id -> {"node": Ray node id, "gpus": [ids]}
        self._listed = 0

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.inner.get_node_ids())
        unknown = [n for n in nodes if n not in self.partition]
        if unknown:
            self._ask_partitions(unknown)
        nodes.sort(key=lambda n: (self.partition.get(n, 1 << 62), n))
        self._listed += 1
        random.seed(f"fedhosp-simulation:{self.seed}:{self._listed}")  # what FedAvg's random.sample draws from
        return nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if messages and self.on_evaluate is not None and messages[0].metadata.message_type.startswith("evaluate"):
            content = messages[0].content
            self.on_evaluate(int(content["config"][ROUND_KEY]), content["arrays"])
        return sorted(replies, key=lambda m: (self.partition.get(m.metadata.src_node_id, 1 << 62),
                                              m.metadata.src_node_id))

    def _ask_partitions(self, nodes: list[int]) -> None:
        asked = [Message(RecordDict(), dst_node_id=n, message_type=PARTITION_QUERY) for n in nodes]
        for reply in self.inner.send_and_receive(asked, timeout=self.timeout):
            if reply.has_error():
                log.warning("node %s did not say its partition (%s): it is ordered by node id",
                            reply.metadata.src_node_id, reply.error.reason)
                continue
            answer = reply.content["partition"]
            pid = self.partition[reply.metadata.src_node_id] = int(answer[PARTITION_KEY])
            if RAY_NODE_KEY in answer:
                self.ray_node[pid] = {"node": str(answer[RAY_NODE_KEY]),
                                      "gpus": [str(g) for g in answer.get(RAY_GPUS_KEY, [])]}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / NODES).write_text(json.dumps({str(k): v for k, v in sorted(self.partition.items())}))
        if self.ray_node:
            (self.out_dir / RAY_NODES).write_text(
                json.dumps({site_name(pid): node for pid, node in sorted(self.ray_node.items())}, indent=1))

