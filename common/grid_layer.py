"""A Flower Grid in front of another one: the base of every grid the ServerApp talks through.

Each layer changes one thing (waits for sites, packs the wire, polls promptly, orders
simulated sites) and passes every other call of Flower's `Grid` interface to the grid
below it, by name, not by `__getattr__`: a call Flower adds to `Grid` in a later release
is an abstract method here too, so it fails loudly instead of skipping a layer. The
order of the layers is set in one place, `server/assembly.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class GridLayer(Grid):
    """Every Grid call goes to `inner` unless a subclass changes it."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run_id: Any) -> None:
        self.inner.set_run(run_id)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


def layers(grid: Grid) -> list[str]:
    """The stack from the top (what the strategy sees) down to the engine's own grid, by class name."""
    names = [type(grid).__name__]
    while isinstance(grid, GridLayer):
        grid = grid.inner
        names.append(type(grid).__name__)
    return names
