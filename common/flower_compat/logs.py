"""Flower's console output, quieter: its logger has a public name ("flwr") but its console handler
is configured only through `flwr.supercore.logger.update_console_handler`."""

from __future__ import annotations

import logging


def quiet_console(verbose: bool) -> None:
    """Flower's console handler shows errors only, unless `verbose` (with its timestamps and colours)."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.INFO if verbose else logging.ERROR, timestamps=verbose, colored=verbose)
