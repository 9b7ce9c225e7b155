"""One array per ArrayRecord on the wire: exactly the same record after the trip, far fewer Flower objects."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.flower_compat import engine, packing
from common.flower_compat.packed_grid import PackedGrid
from common.models import build_model
from common.weights import plain_state_dict


@pytest.fixture(autouse=True)
def _identity():
    """Messages are stamped with the task's run and node: as in a ServerApp."""
    with engine.acting_as(run_id=1, node_id=0):
        yield


def _model_record() -> ArrayRecord:
    return ArrayRecord(torch_state_dict=plain_state_dict(build_model("classification", "cnn")))


def _same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a:
        x, y = a[key].numpy(), b[key].numpy()
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        np.testing.assert_array_equal(x, y)


def test_a_model_comes_back_exactly_with_every_dtype_and_shape():
    record = _model_record()
    extra = ArrayRecord({"counter": Array(np.array(7, dtype=np.int64)),  # a BatchNorm's num_batches_tracked
                         "half": Array(np.arange(6, dtype=np.float16).reshape(2, 3)),
                         "empty": Array(np.zeros((0, 4), dtype=np.float32)),
                         "fortran": Array(np.asfortranarray(np.arange(12.0).reshape(3, 4)))})
    for original in (record, extra):
        packed = packing.pack(original)
        assert packing.is_packed(packed) and len(packed[packing.KEY].numpy().shape) == 1
        _same(packing.unpack(packed), original)


def test_a_plain_record_passes_through_and_a_corrupt_one_is_refused():
    record = _model_record()
    assert packing.unpack(record) is record
    packed = packing.pack(record)
    raw = packed[packing.KEY].numpy()
    with pytest.raises(ValueError, match="more than its header"):
        packing.unpack(ArrayRecord({packing.KEY: Array(np.concatenate([raw, np.zeros(4, np.uint8)]))}))


def test_a_train_message_is_a_handful_of_objects_instead_of_two_per_tensor():
    def message(arrays: ArrayRecord) -> Message:
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1}),
                              "metrics": MetricRecord({"n": 3})})
        return Message(content=content, dst_node_id=1, message_type="train")

    plain = packing.wire_objects(message(_model_record()))
    packed = packing.wire_objects(message(packing.pack(_model_record())))
    assert plain >= 2 * len(_model_record()) and packed <= 8, (plain, packed)


class _Loopback:
    """A Grid that answers each message with its own content, as it arrived: what a site would see."""

    def __init__(self) -> None:
        self.seen: list[RecordDict] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.seen.append(msg.content)
            copy = RecordDict({k: v for k, v in msg.content.items()})
            replies.append(Message(content=copy, reply_to=_as_received(msg)))
        return replies


def _as_received(msg: Message) -> Message:
    engine.stamp_message_id(msg)  # a pushed message has its id
    return msg


def test_the_server_sends_packed_records_and_its_strategies_see_plain_ones():
    record, grid = _model_record(), _Loopback()
    shared = RecordDict({"arrays": record, "config": ConfigRecord({"r": 1})})  # as Flower's FedAvg builds them
    messages = [Message(content=shared, dst_node_id=n, message_type="train") for n in (1, 2)]
    messages.append(Message(content=RecordDict({"arrays": record}), dst_node_id=3, message_type="train"))
    replies = list(PackedGrid(grid).send_and_receive(messages))
    assert all(packing.is_packed(c["arrays"]) for c in grid.seen)
    assert grid.seen[0]["arrays"] is grid.seen[2]["arrays"]  # the shared model was packed once
    for reply in replies:
        _same(reply.content["arrays"], record)  # packed exactly once on the way out
    assert dict(replies[0].content["config"]) == {"r": 1}
    assert all(msg.content["arrays"] is record for msg in messages)  # the caller's messages stay plain
    assert [m.metadata.dst_node_id for m in messages] == [1, 2, 3]


def test_the_clientapp_sees_plain_records_and_answers_in_kind():
    from client.app import _guarded

    seen = []

    def handler(msg, context):
        seen.append(msg.content["arrays"])
        return RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"n": 1})})

    run = _guarded(handler)
    record = _model_record()
    for sent, packed in ((record, False), (packing.pack(record), True)):
        msg = _as_received(Message(content=RecordDict({"arrays": sent}), dst_node_id=1, message_type="train"))
        reply = run(msg, None)
        assert not packing.is_packed(seen[-1])
        _same(seen[-1], record)
        assert packing.is_packed(reply.content["arrays"]) == packed
        _same(packing.unpack(reply.content["arrays"]), record)


def test_a_corrupt_packed_request_fails_the_site_with_its_class_name_only():
    from client.app import _guarded

    raw = packing.pack(_model_record())[packing.KEY].numpy()
    corrupt = ArrayRecord({packing.KEY: Array(np.concatenate([raw, np.zeros(4, np.uint8)]))})
    msg = _as_received(Message(content=RecordDict({"arrays": corrupt}), dst_node_id=1, message_type="train"))
    with pytest.raises(RuntimeError) as failure:
        _guarded(lambda msg, context: pytest.fail("the handler ran on a corrupt record"))(msg, None)
    assert str(failure.value) == "site failed: ValueError (details in the site's log)"
