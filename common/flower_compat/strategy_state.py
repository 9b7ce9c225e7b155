"""What a Flower strategy carries from one round to the next, by attribute name: Flower 1.41 has no
`Strategy.state_dict()`.

FedAdam/FedYogi/FedAdagrad keep their moments in `m_t`, `v_t` and the last global model in
`current_arrays`; the adaptive-clipping DP wrappers their norm in `clipping_norm` and the
strategy they wrap in `strategy`; our SCAFFOLD (server/scaffold.py) its variate in `control`.
tests/common/flower_compat/test_strategy_state.py checks that each of Flower's strategies
really moves these after a round, so a rename upstream fails there, not in a resumed run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy

STATEFUL = ("m_t", "v_t", "current_arrays", "control", "clipping_norm")


def layers(strategy: Strategy) -> list[Strategy]:
    """The strategy and every strategy it wraps (Flower's DP wrappers keep theirs in `.strategy`)."""
    found = [strategy]
    while isinstance(getattr(found[-1], "strategy", None), Strategy):
        found.append(found[-1].strategy)
    return found


def capture(strategy: Strategy) -> list[dict[str, Any]]:
    """The between-round state of every layer, as tensors and floats (loadable with weights_only)."""
    return [_capture(layer) for layer in layers(strategy)]


def restore(strategy: Strategy, saved: list[dict[str, Any]]) -> None:
    for layer, state in zip(layers(strategy), saved, strict=True):
        for name, value in state.items():
            setattr(layer, name, {k: v.numpy() for k, v in value.items()} if isinstance(value, dict) else value)


def _capture(layer: Strategy) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name in STATEFUL:
        value = getattr(layer, name, None)
        if isinstance(value, dict):
            state[name] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in value.items()}
        elif isinstance(value, int | float) and not isinstance(value, bool):
            state[name] = float(value)
    return state
