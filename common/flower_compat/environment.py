"""Flower's internal environment toggles, which no process we start may inherit.

Flower 1.41 reads FLWR_INTERNAL_GRPC_CONTROL_API or FLWR_INTERNAL_GRPC_FLEET_API set to 1 as "also start
the legacy gRPC servers" on their default addresses (0.0.0.0:9093 / :9092,
flwr/superlink/cli/flower_superlink.py): a Control API beside nginx, not behind it. The prefix is
Flower's, undocumented, so it lives here; the stripping is not gated by `enabled()`: it is a
protection, not a speed-up.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "FLWR_INTERNAL_"


def without_internal(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less every FLWR_INTERNAL_* setting, whoever set it."""
    return {k: v for k, v in env.items() if not k.startswith(PREFIX)}
