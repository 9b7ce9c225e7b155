"""Console logging for fedhosp's own loggers only: other libraries' levels are never touched.

Opacus calls `logging.basicConfig()` at import, so our loggers do not propagate to
the root logger (which would print every line twice).
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("common", "server", "client", "simulation", "fedhosp")


class _Stderr(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record is written, not when the handler was made:
    whoever swaps stderr (pytest's capture, per test) would otherwise leave it writing to a closed file."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def ensure_console(level: int = logging.INFO) -> None:
    """Attach one stderr handler to each fedhosp package logger, once."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not any(getattr(h, "_fedhosp", False) for h in logger.handlers):
            handler = _Stderr()
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler._fedhosp = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def quiet_root(level: int = logging.ERROR) -> None:
    """For the CLI, which owns its process: replace the root handler Opacus's import installed.

    Flower's logger propagates to the root logger, so Opacus's `basicConfig()` handler
    prints every Flower record (DEBUG included) a second time; ours shows only `level`+.
    """
    handler = _Stderr()
    handler.setLevel(level)
    logging.basicConfig(handlers=[handler], force=True)
