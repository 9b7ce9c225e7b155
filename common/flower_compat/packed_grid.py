"""The server's side of packing.py: what it pushes goes out packed, what it pulls comes back unpacked.

The lowest layer of every engine's stack (server/assembly.py), right on the engine's own grid,
so the strategies, validation, checkpoints and every layer above only ever see plain ArrayRecords.
A reply that cannot be unpacked (a broken or hostile site) never raises here: its content becomes
one `UNREADABLE` record with the reason, which the server's reply schema rejects (server/validation.py),
so one bad reply costs that site its round, not the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common.flower_compat.packing import pack_content, unpack_content
from common.grid_layer import GridLayer
from common.protocol import UNREADABLE

log = logging.getLogger(__name__)


class PackedGrid(GridLayer):
    """A Grid whose messages travel with their ArrayRecords packed."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(_packed(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return _unpacked(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return _unpacked(self.inner.send_and_receive(_packed(messages), timeout=timeout))


def _packed(messages: Iterable[Message]) -> list[Message]:
    """Packed copies: the caller's messages and the RecordDict a strategy shares between them stay plain,
    so a layer above that reads them after sending (central evaluation) still sees the model."""
    done: dict[int, ArrayRecord] = {}  # the global model, shared by every site's message: packed once
    return [_copy(msg, pack_content(RecordDict(dict(msg.content.items())), done)) for msg in messages]


def _copy(msg: Message, content: RecordDict) -> Message:
    meta = msg.metadata
    return Message(content, dst_node_id=meta.dst_node_id, message_type=meta.message_type,
                   ttl=meta.ttl, group_id=meta.group_id)


def _unpacked(replies: Iterable[Message]) -> list[Message]:
    replies = list(replies)
    for msg in replies:
        if not msg.has_error():
            _unpack_one(msg)
    return replies


def _unpack_one(msg: Message) -> None:
    """Unpack in place; a reply that fails to unpack keeps only the reason, under `UNREADABLE`."""
    try:
        unpack_content(msg.content)
    except Exception as exc:  # whatever a malformed packed array raises, it is this reply's
        reason = f"{type(exc).__name__}: {exc}"[:200]
        log.warning("reply from site %s could not be unpacked: %s", msg.metadata.src_node_id, reason)
        msg.content = RecordDict({UNREADABLE: ConfigRecord({"reason": reason})})
