"""SCAFFOLD's server side (Karimireddy et al., 2020), on top of Flower's FedAvg.

Flower has no SCAFFOLD. The server keeps the control variate c, sends it beside the
global weights every round (`scaffold-c`), and moves it by the sites' changes
(`scaffold-delta-c`): c <- c + |S|/N * mean(delta c_i). The weights are aggregated by
FedAvg (global step size 1). Each site's own c_i stays on its disk (client/scaffold.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.protocol import SCAFFOLD_CONTROL as CONTROL
from common.protocol import SCAFFOLD_DELTA as DELTA


class Scaffold(FedAvg):
    def __init__(self, *, total_sites: int, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.total_sites = total_sites
        self.control: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.control is None:
            self.control = {k: np.zeros_like(a.numpy()) for k, a in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            msg.content[CONTROL] = _record(self.control)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas = [msg.content.pop(DELTA) for msg in replies if not msg.has_error() and DELTA in msg.content]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and deltas and self.control is not None:
            share = len(deltas) / max(self.total_sites, len(deltas))
            for key in self.control:
                mean = np.mean([d[key].numpy() for d in deltas], axis=0)
                self.control[key] = self.control[key] + share * mean
        return arrays, metrics

    def state(self) -> dict[str, np.ndarray]:
        """The control variate, for the server's checkpoint."""
        return dict(self.control or {})


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
