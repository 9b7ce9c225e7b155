"""Flower 1.41, quarantined: the only package that touches Flower beyond its public API.

Everything else in fedhosp imports only Flower's documented modules (`flwr.app`,
`flwr.serverapp`, `flwr.serverapp.strategy`, `flwr.clientapp`, `flwr.simulation`) and
flwr-datasets' partitioners; tests/test_flower_boundary.py enforces it. What follows is
every private Flower name we rely on, why, and what upstream would let us delete it.

Speed-ups, on only while `enabled()` (the Flower version we read, and the switch not off):
- `waits.py`: the SuperNode's literal `time.sleep(3)` (idle pull) and `time.sleep(0.5)`
  (reply check) in `flwr.supernode.start_client_internal`, through its `time` global;
  the back-off keyword defaults of `flwr.supercore.inflatable.inflatable_utils.pull_objects`
  and `pull_and_inflate_object_from_tree`; the entry `flwr.supernode.cli.flower_supernode`.
  Upstream: make these intervals settings of the SuperNode / grid.
- `packing.py`, `packed_grid.py`: every ArrayRecord as one array on the wire, since Flower
  sends each array as its own objects, one call each per hop (`wire_objects` counts them
  with `flwr.supercore.inflatable.inflatable_object.get_all_nested_objects`).
  Upstream: ship an ArrayRecord as one object.
- `polling.py`: replies pulled every 0.1 s through the Grid's public push/pull, since the
  deployment grid's `send_and_receive` sleeps 3 s between pulls. Upstream: a pull interval.
- `clientapp.py`: the warm clientapp zygote (fedhosp/warm_clientapp.py) runs
  `flwr.supernode.cli.flwr_clientapp:flwr_clientapp` in a forked child.
  Upstream: a long-lived clientapp process, or a documented entry point.
Needed to work at all (no switch; their tests fail loudly on another version):
- `engine.py`: `flwr.supercore.task_identity.TaskIdentity`'s `_run_id`/`_node_id`/`_task_id`
  and `Message.metadata._message_id`, set by the in-process engine as Flower's engines do.
- `strategy_state.py`: the attributes Flower's strategies keep between rounds (`m_t`,
  `v_t`, `current_arrays` of FedAdam/FedYogi/FedAdagrad; `clipping_norm` of the adaptive
  DP wrappers), saved for resume. Upstream: `Strategy.state_dict()`.
- `cli_output.py`: the run id in `flwr run`'s output and the shape of Flower's log lines.
  Upstream: `flwr run --format json` that streams.
- `logs.py`: `flwr.supercore.logger.update_console_handler`, to quiet Flower's console.
- `environment.py`: the `FLWR_INTERNAL_*` toggles (legacy gRPC servers on 0.0.0.0), stripped from the
  environment of every Flower process fedhosp starts (fedhosp/processes.py), never gated.
  Upstream: no undocumented toggle that opens a listener.
- `clientapp.py` `APPS`: Flower's bundle folder under its home (`apps/`, `flwr.common.constant.APP_DIR`),
  which the site's approved-code guard watches. Upstream: a hook to approve a FAB before it is loaded.
- `clientapp.py` `task_identity()`: `flwr.supercore.task_identity.TaskIdentity`'s run and node
  id in a clientapp process, to label the site's approved-code audit line (fedhosp/approved_code.py);
  None when absent. Upstream: the run's FAB hash and ids in the ClientApp's `Context`.

The version gate: `FLOWER_VERSION`, the one release whose source this was checked against
(pyproject pins it). The switch: FEDHOSP_FLOWER_WORKAROUNDS=off runs Flower as shipped.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os

FLOWER_VERSION = "1.41.0"
SWITCH = "FEDHOSP_FLOWER_WORKAROUNDS"

log = logging.getLogger(__name__)
_warned: set[str] = set()


def installed_version() -> str:
    try:
        return importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def enabled() -> bool:
    """Whether the speed-ups apply in this process: on the Flower version we read, unless switched off."""
    if os.environ.get(SWITCH, "on").lower() in ("off", "0", "false", "no"):
        return False
    version = installed_version()
    if version == FLOWER_VERSION:
        return True
    if version not in _warned:
        _warned.add(version)
        log.warning("flwr %s is installed; fedhosp's workarounds were written for %s and are off: Flower runs as "
                    "shipped (deployment rounds are slower). See common/flower_compat/__init__.py.", version,
                    FLOWER_VERSION)
    return False
