"""Every ArrayRecord of a message travels as one array: a few wire objects instead of ~30 per model.

Flower 1.41 sends a message as a tree of content-addressed objects (the message, its
records, each array and each array's chunks), and every object is its own call at every
hop: ServerApp -> SuperLink -> SuperNode -> clientapp, and back. For our models that is
2 objects per tensor (the CNN: 14 tensors, 29 objects in a train message), and on loopback the
calls, not the bytes, were most of a deployment round (bench/deployment.py). Packing
an ArrayRecord into one uint8 array (a JSON header of names, dtypes and shapes, then
the raw bytes) cuts that message to 7 objects. It carries exactly what the record
held: the same arrays, names and order; nothing is added.

The ServerApp packs what it pushes to Flower's grid and unpacks what it pulls
(common/flower_compat/packed_grid.py, in `make_app`); the ClientApp unpacks what it receives and
packs its reply if the request came packed. Engines and tests that hand `server.app.run`
their own grid see plain records throughout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

KEY = "fedhosp-packed"  # the only key of a packed ArrayRecord
_LENGTH = 8  # bytes of the header's length, little-endian


def pack(record: ArrayRecord) -> ArrayRecord:
    """`record` as one array; a packed record as it is (Flower's strategies share one RecordDict between
    the messages of a round, so its record is seen once per message)."""
    if is_packed(record):
        return record
    arrays = {key: record[key].numpy() for key in record}
    header = json.dumps({"keys": list(arrays), "dtypes": [a.dtype.str for a in arrays.values()],
                         "shapes": [list(a.shape) for a in arrays.values()]}).encode()
    parts = [len(header).to_bytes(_LENGTH, "little"), header,
             *(np.ascontiguousarray(a).tobytes() for a in arrays.values())]
    return ArrayRecord({KEY: Array(np.frombuffer(b"".join(parts), dtype=np.uint8))})


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [KEY]


def has_packed(content: RecordDict) -> bool:
    return any(is_packed(record) for record in content.array_records.values())


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The record `pack` was given; a record that is not packed, as it is."""
    if not is_packed(record):
        return record
    raw = record[KEY].numpy().tobytes()
    size = int.from_bytes(raw[:_LENGTH], "little")
    header = json.loads(raw[_LENGTH:_LENGTH + size])
    offset, arrays = _LENGTH + size, {}
    for key, dtype, shape in zip(header["keys"], header["dtypes"], header["shapes"], strict=True):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        value = np.frombuffer(raw, dtype=dt, count=count, offset=offset) if count else np.empty(0, dt)
        arrays[key] = Array(value.reshape(shape).copy())
        offset += count * dt.itemsize
    if offset != len(raw):
        raise ValueError(f"a packed ArrayRecord holds {len(raw) - offset} bytes more than its header describes")
    return ArrayRecord(arrays)


def pack_content(content: RecordDict, done: dict[int, ArrayRecord] | None = None) -> RecordDict:
    """`content`, its ArrayRecords packed in place; `done` packs a record shared by several messages once."""
    return _map(content, pack, {} if done is None else done)


def unpack_content(content: RecordDict) -> RecordDict:
    """`content`, its packed ArrayRecords unpacked in place."""
    return _map(content, unpack, {})


def _map(content: RecordDict, codec: Callable[[ArrayRecord], ArrayRecord], done: dict[int, ArrayRecord]) -> RecordDict:
    for key, record in list(content.array_records.items()):
        if id(record) not in done:
            done[id(record)] = codec(record)
        content[key] = done[id(record)]
    return content


def wire_objects(msg: Message) -> int:
    """How many objects Flower sends for `msg` as it is: each is one call per hop."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return len(get_all_nested_objects(msg))


def wire_bytes(msg: Message) -> int:
    """The message itself (metadata, its content's id) plus its content's objects, ArrayRecords packed."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    content = RecordDict({k: pack(v) if isinstance(v, ArrayRecord) else v for k, v in msg.content.items()})
    return len(msg.deflate()) + sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def answering_in_kind(handler: Callable[[Message, Any], Message]) -> Callable[[Message, Any], Message]:
    """A ClientApp handler that sees plain records and replies packed when the request came packed."""
    def answer(msg: Message, context: Any) -> Message:
        packed = has_packed(msg.content)
        unpack_content(msg.content)
        reply = handler(msg, context)
        if packed and not reply.has_error():
            pack_content(reply.content)
        return reply

    return answer
