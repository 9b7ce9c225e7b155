"""Flower 1.41's fixed waits in deployment, shortened in the processes fedhosp starts.

A deployment round on loopback took ~17 s against 2 s in simulation. Timestamps per
message at the sites (the site log; bench/deployment.py prints them per phase) put much
of it in waits that are literals in Flower's source, with no setting:
- the SuperNode sleeps 3 s whenever a pull finds no message, and it always does right
  after sending a reply (the server has not aggregated yet): ~3 s before train and
  again before evaluate (`flwr/supernode/start_client_internal.py`);
- it checks every 0.5 s, in memory, whether the clientapp's reply is ready (same file);
- object pulls back off 1 s, then 2, 4 ... (`pull_objects`, `pull_and_inflate_object_from_tree`):
  the forked clientapp asks for a message's objects while the SuperNode is still
  receiving them, and the ServerApp for a reply's while the SuperNode is still sending.

We shorten them only in processes we start (the SuperNode through `python -m
common.flower_compat.waits flower-supernode ...`, the clientapp zygote, our ServerApp) and only
while `common.flower_compat.enabled()`: on any other Flower version Flower runs as shipped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from common.flower_compat import enabled

# The SuperNode's idle pull, 3 s in Flower: a signed Fleet API call per idle site this often.
IDLE_PULL_S = 0.5
# Its in-memory wait for the clientapp's reply, 0.5 s in Flower: a dictionary lookup.
REPLY_CHECK_S = 0.1
# Object pulls: first retry after this, doubling up to the cap (Flower: 1 s, capped at 10 s).
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 1.0
# The literal sleeps of start_client_internal.py, mapped to ours; any other value is left alone.
SUPERNODE_SLEEPS = {3: IDLE_PULL_S, 0.5: REPLY_CHECK_S}


class _ShorterSleeps:
    """Stands in for the `time` module inside one Flower module: the same, but its known sleeps are shorter."""

    def __init__(self, sleeps: dict[float, float]) -> None:
        self._sleeps = sleeps

    def sleep(self, seconds: float) -> None:
        time.sleep(self._sleeps.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_supernode_loop(module: ModuleType | None = None) -> bool:
    """The SuperNode's idle pull and reply check (True if applied)."""
    if not enabled():
        return False
    if module is None:
        from flwr.supernode import start_client_internal as module
    if getattr(module, "time", None) is not time:
        return isinstance(getattr(module, "time", None), _ShorterSleeps)
    module.time = _ShorterSleeps(SUPERNODE_SLEEPS)  # type: ignore[attr-defined]
    return True


def shorten_object_pulls() -> bool:
    """Object-pull back-off, for every caller in this process that relies on Flower's defaults (True if applied)."""
    if not enabled():
        return False
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    if not all({"initial_backoff", "backoff_cap"} <= set(f.__kwdefaults__ or {}) for f in functions):
        return False
    for function in functions:
        function.__kwdefaults__.update(initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)
    return True


def supernode_command(flower_cmd: Sequence[str]) -> list[str]:
    """`flower-supernode ARGS` as a process that shortens the waits first."""
    return [sys.executable, "-m", "common.flower_compat.waits", *flower_cmd]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "flower-supernode":
        raise SystemExit("usage: python -m common.flower_compat.waits flower-supernode [ARGS ...]")
    shorten_supernode_loop()
    shorten_object_pulls()
    from flwr.supernode.cli import flower_supernode

    sys.argv = args
    flower_supernode()


if __name__ == "__main__":
    main()
