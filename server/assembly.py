"""The one assembly of the grid the ServerApp's round loop talks through, for every engine.

Deployment (`flwr run` on a SuperLink), Flower's simulation engine (Ray) and the in-process
engine each hand us their own Grid; `compose` stacks the same layers on it, in this order
(top first, the strategy's side):

    WaitingGrid      server/waiting.py        a minimum of sites, but not forever
    [simulation]     simulation/grid.py       sites in partition order, seeded sampling (simulation only)
    PromptGrid       flower_compat/polling    replies pulled as they arrive
    PackedGrid       flower_compat/packed_grid  one array per ArrayRecord on the wire
    engine's grid    Flower's (or simulation/inprocess.py)

So every engine runs the same code and the same wire: what a hospital receives in
deployment is what a simulated site receives. With Flower's workarounds switched off
(`common.flower_compat.enabled()` false), PromptGrid and PackedGrid are left out, in every
engine alike. The stack is written to the run log (`grid` event) so a test can compare them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.serverapp import Grid

from common import flower_compat
from common.config import RunConfig
from common.flower_compat.packed_grid import PackedGrid
from common.flower_compat.polling import PromptGrid
from server.waiting import WaitingGrid

log = logging.getLogger(__name__)
Layer = Callable[[Grid], Grid]


def compose(engine_grid: Grid, cfg: RunConfig, simulation: Layer | None = None) -> WaitingGrid:
    """The ServerApp's grid over `engine_grid`; `simulation` is the simulation's own layer, if any."""
    grid = engine_grid
    if flower_compat.enabled():
        grid = PromptGrid(PackedGrid(grid))
    if simulation is not None:
        grid = simulation(grid)
    return WaitingGrid(grid, cfg.min_available_sites, cfg.site_wait)
