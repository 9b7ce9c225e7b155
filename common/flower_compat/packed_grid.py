"""The server's side of packing.py: what it pushes goes out packed, what it pulls comes back unpacked.

Wrapped directly around Flower's grid in `server.app.make_app` (under polling and waiting), so
the strategies, validation, checkpoints and any grid a caller of `run` puts in front
only ever see plain ArrayRecords.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from common.flower_compat.packing import pack_content, unpack_content


class PackedGrid:
    """A Grid (by delegation) whose messages travel with their ArrayRecords packed."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(_packed(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return _unpacked(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return _unpacked(self._grid.send_and_receive(_packed(messages), timeout=timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _packed(messages: Iterable[Message]) -> list[Message]:
    messages = list(messages)
    done: dict[int, ArrayRecord] = {}  # the global model, shared by every site's message: packed once
    for msg in messages:
        pack_content(msg.content, done)
    return messages


def _unpacked(replies: Iterable[Message]) -> list[Message]:
    replies = list(replies)
    for msg in replies:
        if not msg.has_error():
            unpack_content(msg.content)
    return replies
