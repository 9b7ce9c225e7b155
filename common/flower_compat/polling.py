"""Replies collected as they arrive: Flower's deployment grid checks for them only every 3 s.

`Grid.send_and_receive` of Flower 1.41's HTTP grid (the deployment engine's) pushes the
messages, then sleeps 3 s between pulls: a message answered in 0.1 s costs up to 3 s, twice
a round (train, evaluate). This wrapper does the same push and pull through the Grid's
public `push_messages` / `pull_messages`, every `interval` seconds, on the coordinator's own
loopback connection to its SuperLink; every other Grid call passes through.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from common.grid_layer import GridLayer

INTERVAL_S = 0.1  # as often as Flower's simulation grid pulls; on loopback in deployment


class PromptGrid(GridLayer):
    """A Grid whose send_and_receive polls every `interval` seconds."""

    def __init__(self, grid: Grid, interval: float = INTERVAL_S) -> None:
        super().__init__(grid)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies
