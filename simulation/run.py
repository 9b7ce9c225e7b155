"""Run the real ServerApp and ClientApp against virtual hospitals on this machine.

Each virtual site reads its own folder `<data-root>/site-NNN` and keeps its state in
`<state-root>/site-NNN`, exactly as a hospital would; only the engine differs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from client.site import site_from_context
from common.config import RunConfig
from common.data import sources, synthetic
from common.errors import ConfigError
from common.logs import quiet_root

log = logging.getLogger(__name__)
SYNTH_SPEC = "synth.json"


@dataclass(frozen=True)
class SimulationOptions:
    sites: int
    images_per_site: int = 500
    synthesize: bool = True  # False: the sites' folders already exist under data-root
    cpus_per_site: float = 1.0
    verbose: bool = False


def prepare_hospitals(cfg: RunConfig, opts: SimulationOptions) -> None:
    """Write synthetic hospitals unless the same ones (same sites, seed, size) are there already."""
    root = Path(cfg.data_root)
    spec = {"sites": opts.sites, "seed": cfg.seed, "images_per_site": opts.images_per_site,
            "format": synthetic.FORMAT}
    marker = root / SYNTH_SPEC
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        log.info("reusing synthetic hospitals in %s", root)
        return
    log.info("writing %d synthetic hospitals to %s ...", opts.sites, root)
    synthetic.write_hospitals(root, opts.sites, cfg.seed, opts.images_per_site)
    marker.write_text(json.dumps(spec))


def preflight(cfg: RunConfig, sites: int) -> None:
    """Decode every site's data here, before the engine starts: a bad folder, manifest or mask
    stops the run with one clear line instead of failing inside a Ray worker, and the sites'
    decode caches are warm when round 1 starts."""
    for pid in range(sites):
        sources.dicom_folder(cfg.site_data_path(pid), cfg.task)  # cheap checks first, for every site
    for pid in range(sites):
        site_from_context(cfg, {"partition-id": pid}).data()


def simulate(cfg: RunConfig, opts: SimulationOptions) -> None:
    """Run `cfg` over `opts.sites` virtual hospitals; the ServerApp writes into cfg.out_dir."""
    if opts.sites < 1:
        raise ConfigError(f"--sites = {opts.sites}: a federation needs at least 1 site")
    if opts.synthesize:
        prepare_hospitals(cfg, opts)
    preflight(cfg, opts.sites)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Imported here: importing Flower's simulation engine pulls in Ray (seconds).
    import ray
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_app

    _quiet_flower(opts.verbose)
    quiet_root(logging.WARNING if opts.verbose else logging.ERROR)

    backend_config = {
        "client_resources": {"num_cpus": opts.cpus_per_site, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "INFO" if opts.verbose else "ERROR",
            "log_to_driver": opts.verbose,
        },
    }
    try:
        run_simulation(
            server_app=make_app(cfg.to_mapping()),
            client_app=client_app,
            num_supernodes=opts.sites,
            backend_config=backend_config,
            verbose_logging=opts.verbose,
        )
    finally:
        if ray.is_initialized():  # Flower shuts Ray down on success; make sure on failure too
            ray.shutdown()


def _quiet_flower(verbose: bool) -> None:
    """Flower's console handler shows errors only unless --verbose (Flower's own switch)."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.INFO if verbose else logging.ERROR, timestamps=verbose, colored=verbose)


