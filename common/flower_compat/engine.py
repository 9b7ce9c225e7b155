"""Playing the engine's part for an in-process Grid: the ids Flower stamps on every message.

Flower 1.41 stamps a Message's run, source node and task from `TaskIdentity` (class
attributes the engine sets in each worker: `_run_id`, `_node_id`, `_task_id`), and a grid
gives each pushed message its id by writing `metadata._message_id` (as Flower's own
`InMemoryGrid.push_messages` does). Neither has a public setter; the in-process engine
(simulation/inprocess.py) and tests that answer messages without an engine need both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from uuid import uuid4

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def acting_as(run_id: int, node_id: int, task_id: int = 1) -> Iterator[None]:
    """Messages built inside come from `node_id` in run `run_id`, as in an engine's worker."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def stamp_message_id(message: Message) -> str:
    """Give a pushed message its id (replies carry it back as `reply_to_message_id`)."""
    message_id = str(uuid4())
    message.metadata.__dict__["_message_id"] = message_id
    return message_id
