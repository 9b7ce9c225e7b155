"""The simulation's grid: sites in partition order whatever Flower's node ids and reply order."""

from __future__ import annotations

import json
import random

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common.flower_compat.engine import acting_as
from simulation.clientapp import PARTITION_KEY, PARTITION_QUERY
from simulation.grid import CanonicalGrid


class ShuffledGrid:
    """Random node ids per run; replies come back in reverse order."""

    def __init__(self, sites: int, seed: int) -> None:
        rng = random.Random(seed)
        self.partition = {rng.randrange(1, 2**62): pid for pid in range(sites)}

    def get_node_ids(self):
        return list(self.partition)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == PARTITION_QUERY:
                content = RecordDict({"partition": ConfigRecord({PARTITION_KEY: self.partition[node]})})
            else:
                content = RecordDict({"config": ConfigRecord({"pid": self.partition[node]})})
            with acting_as(1, node):  # the engine stamps who answered
                replies.append(Message(content, reply_to=msg))
        return list(reversed(replies))


def _round(grid: CanonicalGrid, message_type: str = "train"):
    with acting_as(1, 0):  # the server's side
        return _send(grid, message_type)


def _send(grid: CanonicalGrid, message_type: str):
    nodes = list(grid.get_node_ids())
    sampled = random.sample(nodes, 3)  # what FedAvg does with fraction-train < 1
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 1}), "arrays": ArrayRecord()}),
                        dst_node_id=n, message_type=message_type) for n in sampled]
    replies = grid.send_and_receive(messages)
    return [grid.partition[n] for n in sampled], [grid.partition[r.metadata.src_node_id] for r in replies]


def test_partition_order_and_sampling_do_not_depend_on_node_ids(tmp_path):
    runs = []
    for seed in (1, 2):
        grid = CanonicalGrid(ShuffledGrid(6, seed), seed=7, out_dir=tmp_path / str(seed))
        with acting_as(1, 0):
            nodes = list(grid.get_node_ids())
        assert [grid.partition[n] for n in nodes] == list(range(6))
        runs.append(_round(grid))
        saved = json.loads((tmp_path / str(seed) / "nodes.json").read_text())
        assert sorted(saved.values()) == list(range(6))
    (sampled_a, replied_a), (sampled_b, replied_b) = runs
    assert sampled_a == sampled_b  # the same partitions, though their node ids differ
    assert replied_a == sorted(replied_a) == replied_b


def test_each_round_global_model_goes_to_the_central_evaluation(tmp_path):
    seen = []
    grid = CanonicalGrid(ShuffledGrid(4, 0), seed=0, out_dir=tmp_path, on_evaluate=lambda r, a: seen.append(r))
    _round(grid, "train")
    _round(grid, "evaluate")
    assert seen == [1]
