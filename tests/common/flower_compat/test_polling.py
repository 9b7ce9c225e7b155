"""PromptGrid: replies are collected as they arrive, within the timeout, through the Grid's own push/pull."""

import time
from types import SimpleNamespace

from common.flower_compat.polling import PromptGrid


class SlowSites:
    """A grid whose reply to message i becomes available `delays[i]` seconds after the push."""

    def __init__(self, delays):
        self.delays, self.pulls, self.pushed_at = delays, 0, None

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if now >= self.delays[int(i[1:])]]

    def get_node_ids(self):
        return [1, 2]


def test_replies_arrive_as_soon_as_they_are_ready_not_on_a_3_s_beat():
    grid = SlowSites([0.0, 0.4])
    started = time.monotonic()
    replies = PromptGrid(grid, interval=0.05).send_and_receive(["a", "b"], timeout=10)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert time.monotonic() - started < 1.5  # Flower's HTTP grid would answer after 3 s
    assert list(PromptGrid(grid).get_node_ids()) == [1, 2]  # everything else passes through


def test_the_timeout_returns_what_arrived():
    grid = SlowSites([0.0, 60.0])
    started = time.monotonic()
    replies = PromptGrid(grid, interval=0.05).send_and_receive(["a", "b"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.3 <= time.monotonic() - started < 2
