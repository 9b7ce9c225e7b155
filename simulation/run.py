"""Run the real ServerApp and ClientApp against virtual hospitals on this machine.

Each virtual site reads its own folder `<data-root>/site-NNN` and keeps its state in
`<state-root>/site-NNN`, exactly as a hospital would; only the engine differs. The sites'
folders are either synthetic hospitals (each its own scanner and population), existing
folders, or one pool (an .npz, a folder, synthetic) split by a partitioner and written once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client.site import site_from_context
from common import process_tree
from common.config import RunConfig, site_name
from common.data import sources, synthetic
from common.errors import ConfigError
from common.flower_compat import logs as flower_logs
from common.logs import ensure_console, quiet_root
from simulation import baselines, pool, report, site_secrets, virtual_sites
from simulation.central import CentralEvaluation, TestSet
from simulation.grid import CanonicalGrid
from simulation.memory import PeakMemory
from simulation.virtual_sites import PartitionOptions

log = logging.getLogger(__name__)
SYNTH_SPEC = "synth.json"
ENGINES = ("ray", "inprocess")


@dataclass(frozen=True)
class SimulationOptions:
    sites: int
    images_per_site: int = 500
    synthesize: bool = True  # False: the sites' folders already exist under data-root
    cpus_per_site: float = 1.0
    verbose: bool = False
    # Split one pool into the sites instead: None keeps the synthetic hospitals / existing folders.
    partition: PartitionOptions | None = None
    pool_data: Path | None = None  # the pool: an .npz or a folder; None: synthetic
    baselines: bool = False  # also train pooled and local-only models, scored on the same held-out data
    derive_site_secrets: bool = True  # DP noise follows the seed (simulation only; see site_secrets)
    engine: str = "ray"  # "inprocess": the same apps, one site after another, no Ray


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
    profiles = synthetic.site_profiles(opts.sites, opts.images_per_site, cfg.seed)
    folders = [root / site_name(p.index) for p in profiles]
    _each_site(synthetic.write_site, [(f, p, cfg.seed) for f, p in zip(folders, profiles, strict=True)],
               "writing hospitals")
    marker.write_text(json.dumps(spec))


def preflight(cfg: RunConfig, sites: int) -> None:
    """Decode every site's data here, before the engine starts: a bad folder, manifest or mask
    stops the run with one clear line instead of failing inside a Ray worker, and the sites'
    decode caches are warm when round 1 starts."""
    for pid in range(sites):
        sources.dicom_folder(cfg.site_data_path(pid), cfg.task)  # cheap checks first, for every site
    _each_site(_decode_site, [(cfg, pid) for pid in range(sites)], "decoding")


def _decode_site(cfg: RunConfig, pid: int) -> None:
    site_from_context(cfg, {"partition-id": pid}).data()


PARALLEL_FROM = 12  # sites; below this, starting worker processes (importing torch) costs more than it saves


def _each_site(fn, jobs: list[tuple], what: str) -> None:
    """Per-site work on every core (100 sites' DICOM writing and decoding is minutes on one), with progress."""
    workers = min(os.cpu_count() or 1, len(jobs))
    started, step = time.monotonic(), max(1, len(jobs) // 10)

    def progress(done: int) -> None:
        if len(jobs) >= PARALLEL_FROM and (done % step == 0 or done == len(jobs)):
            elapsed = time.monotonic() - started
            log.info("%s: %d/%d sites, %.0fs elapsed, eta %.0fs", what, done, len(jobs), elapsed,
                     elapsed / done * (len(jobs) - done))

    if len(jobs) < PARALLEL_FROM or workers < 2:
        for done, job in enumerate(jobs, 1):
            fn(*job)
            progress(done)
        return
    import multiprocessing

    # spawn, not fork: the parent has torch's thread pools, which a forked child can deadlock on
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        for done, future in enumerate(as_completed([ex.submit(fn, *job) for job in jobs]), 1):
            future.result()  # the first failure stops the run with its own error
            progress(done)


def simulate(cfg: RunConfig, opts: SimulationOptions) -> dict[str, Any]:
    """Run `cfg` over `opts.sites` virtual hospitals; the ServerApp writes into cfg.out_dir.

    Returns what the report adds to results.json: partition, baselines, peak memory.
    """
    if opts.sites < 1:
        raise ConfigError(f"--sites = {opts.sites}: a federation needs at least 1 site")
    if opts.engine not in ENGINES:
        raise ConfigError(f"engine = {opts.engine!r} is not one of {' | '.join(ENGINES)}")
    extra: dict[str, Any] = {}
    test = None
    if cfg.client_threads > 0:  # the server's test-split scoring and the baselines run here: same threads as sites
        import torch

        torch.set_num_threads(cfg.client_threads)
    flower_logs.quiet_console(opts.verbose)
    quiet_root(logging.WARNING if opts.verbose else logging.ERROR)
    with PeakMemory() as memory:
        if opts.partition is not None:
            test, extra["partition"] = prepare_pool(cfg, opts)
        elif opts.synthesize:
            prepare_hospitals(cfg, opts)
        preflight(cfg, opts.sites)
        if cfg.dp_enabled and opts.derive_site_secrets:
            site_secrets.write(cfg, opts.sites)
        out = Path(cfg.out_dir)
        for stale in (report.NODES, report.CENTRAL):
            (out / stale).unlink(missing_ok=True)
        central = CentralEvaluation(cfg, test) if test is not None else None

        def wrap(grid):
            return CanonicalGrid(grid, cfg.seed, out, central, cfg.round_timeout_s)

        if opts.engine == "inprocess":
            from simulation.inprocess import run_inprocess

            run_inprocess(cfg, opts.sites, wrap=wrap)
        else:
            _run_engine(cfg, opts, wrap)
        if opts.baselines:
            extra["baselines"] = baselines.run(cfg, opts.sites, test)
    extra["memory"] = memory.peak.to_json()
    extra["engine"] = {"kind": opts.engine, "cpus-per-site": opts.cpus_per_site,
                       "concurrent-sites": _concurrency(opts) if opts.engine == "ray" else 1}
    return extra


SECONDS_PER_WAVE = 120  # a round's time budget per wave of concurrent sites (a 500-image DP site: ~3 s on a free core)


def with_round_timeout(cfg: RunConfig, opts: SimulationOptions) -> RunConfig:
    """An unset round-timeout (meant for real sites answering in parallel) scaled to the sites the
    engine trains one wave after another: 100 virtual sites on 2 cores are 50 waves, and a site that
    misses the timeout drops out of the round. A round-timeout the user set is kept, whatever its value."""
    if cfg.round_timeout:
        return cfg
    waves = math.ceil(opts.sites / _concurrency(opts))
    needed = float(SECONDS_PER_WAVE * waves)
    if needed <= cfg.round_timeout_s:
        return cfg
    log.info("round-timeout %gs for %d sites, %d at a time (set round-timeout to change it)", needed, opts.sites,
             _concurrency(opts))
    return replace(cfg, round_timeout=needed)


def prepare_pool(cfg: RunConfig, opts: SimulationOptions) -> tuple[TestSet | None, dict[str, Any]]:
    """Load the pool, write each site's share once; the pool's test split stays with the simulation."""
    if cfg.task != "classification":
        raise ConfigError("--partition splits labelled images: it supports task = classification only")
    assert opts.partition is not None
    data = pool.load(opts.pool_data, cfg.image_size, Path(cfg.out_dir) / "pool-cache",
                     synthetic_images=opts.sites * opts.images_per_site, seed=cfg.seed)
    top = int(data.labels.max()) + 1
    if top > cfg.num_classes:
        raise ConfigError(f"the pool has labels up to {top - 1}: set num-classes = {top} (--run-config)")
    summary = virtual_sites.write(data, Path(cfg.data_root), opts.sites, opts.partition, cfg.seed)
    test = TestSet(data.test_images, data.test_labels) if data.has_test else None
    return test, summary


def _concurrency(opts: SimulationOptions) -> int:
    return max(1, int((os.cpu_count() or 1) // opts.cpus_per_site))


def _run_engine(cfg: RunConfig, opts: SimulationOptions, wrap) -> None:
    """Flower's simulation engine (Ray). Memory grows with concurrent sites, not with sites:
    each concurrent site is one Ray worker (~1 GB with torch); `cpus-per-site` sets how many."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Imported here: importing Flower's simulation engine pulls in Ray (seconds).
    import ray
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from server.app import run as run_server
    from server.assembly import compose
    from simulation.clientapp import app as client_app

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        ensure_console()
        run_server(compose(grid, cfg, simulation=wrap), cfg, str(context.run_id))

    backend_config = {
        "client_resources": {"num_cpus": opts.cpus_per_site, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "INFO" if opts.verbose else "ERROR",
            "log_to_driver": opts.verbose,
            # Model weights are the only objects: a small store, not Ray's default 30% of RAM.
            "object_store_memory": OBJECT_STORE_BYTES,
        },
    }
    # Ray's workers are still exiting when ray.shutdown() returns, and on Ctrl-C nobody shuts Ray down:
    # `contained` waits for (then stops) every process Ray started before this returns.
    with process_tree.contained("Ray", settle=RAY_EXIT_S):
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=opts.sites,
                backend_config=backend_config,
                verbose_logging=opts.verbose,
            )
        finally:
            if ray.is_initialized():  # Flower shuts Ray down on success; make sure on failure too
                ray.shutdown()


RAY_EXIT_S = 30.0  # workers leave within seconds of shutdown on an idle machine


OBJECT_STORE_BYTES = 512 * 1024 * 1024
