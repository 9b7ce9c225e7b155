"""Console logging for fedhosp's own loggers only: other libraries' levels are never touched.

Opacus calls `logging.basicConfig()` at import, so our loggers do not propagate to
the root logger (which would print every line twice).
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("common", "server", "client", "simulation", "fedhosp")


def ensure_console(level: int = logging.INFO) -> None:
    """Attach one stderr handler to each fedhosp package logger, once."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not any(getattr(h, "_fedhosp", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    logging.basicConfig(handlers=[handler], force=True)
