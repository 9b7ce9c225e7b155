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
import socket
import sys
import time
import warnings
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
from simulation.grid import RAY_NODES, CanonicalGrid
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
    ray_address: str | None = None  # an existing Ray cluster to run on; None: a Ray of our own, this machine only
    gpus_per_site: float = 0.0  # GPU share Ray reserves per virtual site (0.25: four sites per GPU)


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
    check_resources(opts)
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
        for stale in (report.NODES, report.CENTRAL, RAY_NODES):
            (out / stale).unlink(missing_ok=True)
        central = CentralEvaluation(cfg, test) if test is not None else None

        def wrap(grid):
            return CanonicalGrid(grid, cfg.seed, out, central, cfg.round_timeout_s)

        if opts.engine == "inprocess":
            from simulation.inprocess import run_inprocess

            run_inprocess(cfg, opts.sites, wrap=wrap)
            concurrent = 1
        else:
            concurrent = _run_engine(cfg, opts, wrap)
        if opts.baselines:
            extra["baselines"] = baselines.run(cfg, opts.sites, test)
    extra["memory"] = memory.peak.to_json()
    extra["engine"] = {"kind": opts.engine, "cpus-per-site": opts.cpus_per_site, "gpus-per-site": opts.gpus_per_site,
                       "concurrent-sites": concurrent,
                       **_cluster_summary(opts, out)}
    return extra


def check_resources(opts: SimulationOptions) -> None:
    """Refuse what the engine could not honour, before it starts: Flower's own answer comes from inside
    Ray ("ActorPool is empty"), after seconds of start-up; a wrong cluster address, after minutes of
    Ray's retries. A cluster's CPUs and GPUs are checked on connecting."""
    if opts.gpus_per_site < 0 or opts.cpus_per_site <= 0:
        raise ConfigError(f"--cpus-per-site {opts.cpus_per_site:g} / --gpus-per-site {opts.gpus_per_site:g}: "
                          "a site needs some CPU (> 0) and a GPU share >= 0")
    if opts.ray_address and opts.engine != "ray":
        raise ConfigError(f"--ray-address runs on a Ray cluster: it needs --engine ray, not {opts.engine}")
    if opts.ray_address:
        _probe(opts.ray_address)
    if opts.gpus_per_site > 0 and not opts.ray_address and local_gpus() == 0:
        raise ConfigError(f"--gpus-per-site {opts.gpus_per_site:g}, but this machine has no GPU that torch can "
                          "use (CUDA); drop the option to train on CPUs, or use --ray-address for a cluster with GPUs")


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cluster_summary(opts: SimulationOptions, out: Path) -> dict[str, Any]:
    """Where the sites ran: the cluster's address and how many Ray nodes answered (ray-nodes.json)."""
    if opts.engine != "ray":
        return {}
    path = out / RAY_NODES
    placed = json.loads(path.read_text()).values() if path.is_file() else []
    return {"ray-address": opts.ray_address or "local", "ray-nodes-used": len({p["node"] for p in placed}),
            "sites-with-gpu": sum(bool(p["gpus"]) for p in placed)}


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
    """Sites training at once on this machine: cores ÷ cpus-per-site, and GPUs ÷ gpus-per-site."""
    gpus = local_gpus() if opts.gpus_per_site > 0 else 0
    return max(1, _sites_on({"CPU": os.cpu_count() or 1, "GPU": gpus}, opts))


def _run_engine(cfg: RunConfig, opts: SimulationOptions, wrap) -> int:
    """Flower's simulation engine (Ray), on this machine or a cluster; returns how many sites trained at once.
    Memory grows with concurrent sites, not with sites: each concurrent site is one Ray worker
    (~1 GB with torch); `cpus-per-site` (and `gpus-per-site`) set how many."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # A site that reserved no GPU sees none (CUDA_VISIBLE_DEVICES=""), so device=auto trains on exactly
    # the GPU Ray assigned, or on CPU: Ray's default today, which it warns it will change.
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
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

    # Ray's workers are still exiting when ray.shutdown() returns, and on Ctrl-C nobody shuts Ray down:
    # `contained` waits for (then stops) every process Ray started before this returns. On a cluster the
    # workers belong to the cluster's raylets: only the driver's own helpers are below this process.
    with process_tree.contained("Ray", settle=RAY_EXIT_S):
        try:
            concurrent = connect(opts) if opts.ray_address else _concurrency(opts)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=opts.sites,
                backend_config=backend_config(opts),
                verbose_logging=opts.verbose,
            )
        finally:
            if ray.is_initialized():  # Flower shuts Ray down on success; make sure on failure too
                ray.shutdown()
    return concurrent


def backend_config(opts: SimulationOptions) -> dict[str, Any]:
    """Flower's Ray backend config: what each virtual site reserves, and how Ray starts or is joined.

    `address="local"` starts a Ray of our own even when `ray start` left a cluster on this machine (a
    bare ray.init() would join it). A cluster's size is its own: no CPU count or object store here."""
    logging_args = {"logging_level": "INFO" if opts.verbose else "ERROR", "log_to_driver": opts.verbose}
    if opts.ray_address:
        init_args: dict[str, Any] = {"address": opts.ray_address, **logging_args}
    else:
        init_args = {
            "address": "local",
            "num_cpus": os.cpu_count() or 1,
            **logging_args,
            # Model weights are the only objects: a small store, not Ray's default 30% of RAM.
            "object_store_memory": OBJECT_STORE_BYTES,
        }
    return {"client_resources": {"num_cpus": opts.cpus_per_site, "num_gpus": float(opts.gpus_per_site)},
            "init_args": init_args}


def connect(opts: SimulationOptions) -> int:
    """Join the cluster before Flower does, to fail with one line on a wrong address or a cluster that
    cannot host one site. Flower then reuses this connection; its runtime_env is repeated here: the
    workers import our code from the driver's sys.path, so code and venv sit at the same path on every node."""
    import ray

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
                 **backend_config(opts)["init_args"])
    except ConnectionError as exc:
        raise ConfigError(f"--ray-address {opts.ray_address}: no Ray cluster answers there ({exc})") from exc
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    fits = sum(_sites_on(node, opts) for node in nodes)
    log.info("Ray cluster %s: %d nodes, %g CPUs, %g GPUs: %d sites at a time", opts.ray_address, len(nodes),
             sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes), fits)
    if fits == 0:
        ray.shutdown()
        what = f"{opts.cpus_per_site:g} CPUs" + (f" and {opts.gpus_per_site:g} GPU" if opts.gpus_per_site else "")
        raise ConfigError(f"--ray-address {opts.ray_address}: no node of the cluster has {what} free for one site "
                          f"(nodes: {nodes}); lower --cpus-per-site / --gpus-per-site")
    return fits


PROBE_S = 5.0


def _probe(address: str) -> None:
    """A TCP connect to the cluster's GCS first: Ray retries an address nobody answers at for minutes.
    Addresses Ray resolves itself ("auto", ray://) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({exc}); `ray start --head` "
                          "prints the address to use") from None


def _sites_on(node: dict[str, float], opts: SimulationOptions) -> int:
    """How many sites one node hosts, as Flower sizes its actor pool (per node, CPUs and GPUs)."""
    sites = int(node.get("CPU", 0) // opts.cpus_per_site)
    if opts.gpus_per_site > 0:
        sites = min(sites, int(node.get("GPU", 0) // opts.gpus_per_site))
    return sites


RAY_EXIT_S = 30.0  # workers leave within seconds of shutdown on an idle machine


OBJECT_STORE_BYTES = 512 * 1024 * 1024
