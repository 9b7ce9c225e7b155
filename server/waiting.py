"""Wait for the minimum number of sites, but not forever.

Flower's strategies sample through `sample_nodes`, which polls `grid.get_node_ids()` once
a second until `min_available_nodes` sites are connected, with no limit: a consortium
whose hospitals never come up would hang the coordinator for good. `WaitingGrid` hands
the strategy a grid whose node list gives up with a clear error after `wait` seconds
below the minimum. Sites that do connect in time are sampled exactly as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.serverapp import Grid

from common.errors import FedhospError
from common.grid_layer import GridLayer

log = logging.getLogger(__name__)


class SitesUnavailable(FedhospError):
    """Fewer sites than min-available-sites stayed connected for longer than site-wait."""


class WaitingGrid(GridLayer):
    """A Grid whose `get_node_ids` raises SitesUnavailable past the deadline."""

    def __init__(self, grid: Grid, minimum: int, wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(grid)
        self.minimum, self.wait, self._clock = minimum, wait, clock
        self._since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.inner.get_node_ids())
        if len(nodes) >= self.minimum:
            self._since = None
            return nodes
        now = self._clock()
        if self._since is None:
            self._since = now
            log.info("waiting for sites: %d of %d connected (min-available-sites); giving up after %gs",
                     len(nodes), self.minimum, self.wait)
        elif now - self._since > self.wait:
            raise SitesUnavailable(
                f"only {len(nodes)} of the {self.minimum} sites needed (min-available-sites) connected within "
                f"{self.wait:g}s (site-wait): start the missing hospitals' `fedhosp client`, or lower "
                "min-available-sites"
            )
        return nodes

    def wait_for_sites(self, poll: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> list[int]:
        """Return once `minimum` sites are connected (SitesUnavailable past the deadline). Before every
        round: Flower's strategies size their sample from the node count *before* their own wait for
        `min_available_nodes`, so a site that connects during that wait would sit the round out."""
        while len(nodes := list(self.get_node_ids())) < self.minimum:
            sleep(poll)
        return nodes
