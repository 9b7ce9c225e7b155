"""The `fedhosp` command: the edge where arguments become a RunConfig, once.

Every FedhospError becomes one `error: ...` line and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import interrupts
from common.config import DEVICES, TASKS, RunConfig, parse_overrides
from common.data.partition import SCHEMES as PARTITION_SCHEMES
from common.errors import ConfigError, FedhospError
from common.logs import ensure_console
from fedhosp.deploy_cli import add_deploy_commands

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ensure_console(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    try:
        return int(args.handler(args) or 0)
    except FedhospError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _interrupted()


def _interrupted() -> int:
    """Exit status 130 after Ctrl-C (or the SIGTERM `fedhosp server` / `client` turn into one), also when
    a library's non-daemon thread would block the interpreter's exit. `simulate` does not get here: its
    engine runs under common/interrupts.py, which ends it on the first Ctrl-C whatever Ray does."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        interrupts.exit_now()
    return interrupts.EXIT_STATUS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhosp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="write synthetic hospitals as DICOM folders")
    synth.add_argument("--sites", type=int, required=True, help="number of hospitals")
    synth.add_argument("--out", type=Path, required=True, help="folder to write site-NNN/ folders into")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--images-per-site", type=int, default=500)
    synth.add_argument("--task", choices=TASKS, default="classification",
                       help="accepted for symmetry: every site gets labels.csv and masks (masks.csv) alike")
    synth.set_defaults(handler=cmd_synth)

    sim = sub.add_parser("simulate", help="federate virtual hospitals on this machine or a Ray cluster")
    add_simulate_arguments(sim)
    sim.set_defaults(handler=cmd_simulate)

    sweep = sub.add_parser("sweep", help="one simulation per combination of settings; a table over seeds")
    sweep.add_argument("--grid", required=True, metavar='"KEY=V1,V2 ..."',
                       help='run settings to combine, e.g. "strategy=fedavg,fedprox dp-target-epsilon=1,8 seed=0,1,2"')
    add_simulate_arguments(sweep, out=Path("runs/sweep"))
    sweep.set_defaults(handler=cmd_sweep)

    insp = sub.add_parser("inspect", help="what a site's data folder holds, and whether it is ready to train")
    insp.add_argument("data", type=Path, metavar="DATA", help="the site's data folder")
    insp.add_argument("--task", choices=TASKS, default="classification", help="which manifest to read")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    insp.set_defaults(handler=cmd_inspect)

    ledger = sub.add_parser("ledger", help="a site's privacy ledger")
    ledger_sub = ledger.add_subparsers(required=True, metavar="ACTION")
    show = ledger_sub.add_parser("show", help="print every DP round this site trained, with ε over all runs")
    show.add_argument("--site", type=Path, required=True, help="the site's state folder (where its ledger lives)")
    show.add_argument("--budget", type=float, default=None, help="the site's total ε budget, to show what is left")
    show.add_argument("--ledger-key", type=Path, default=None,
                      help="the ledger's key, to check the site's signatures (default: SITE.ledger-key beside the "
                           "state folder, as `fedhosp client` keeps it)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_ledger_show)

    pred = sub.add_parser("predict", help="apply a trained model to a hospital's images, on this machine only")
    pred.add_argument("--model", type=Path, required=True, help="the model.pt a run wrote")
    pred.add_argument("--data", type=Path, required=True, help="folder of DICOM files (searched recursively)")
    pred.add_argument("--out", type=Path, required=True, help="folder for predictions.csv, metrics.json and PNGs")
    pred.add_argument("--labels", type=Path, default=None, metavar="CSV",
                      help="ground truth, paths relative to --data: file,label (classification) or file,mask "
                           "(segmentation); predicts exactly the files it lists and writes metrics.json")
    pred.add_argument("--explain", action="store_true",
                      help="heatmap PNGs (classification) or predicted-vs-true mask overlays (segmentation)")
    pred.add_argument("--device", choices=DEVICES, default="auto")
    pred.set_defaults(handler=cmd_predict)

    pre = sub.add_parser("pretrain", help="train a backbone without DP on a public pool, for pretrained = PATH")
    pre.add_argument("--data", type=Path, required=True,
                     help="the public pool: a MedMNIST-style .npz (train+val; its test split scores) or a "
                          "labelled folder; never a hospital's data")
    pre.add_argument("--model", required=True, help="any classification model of the registry (cnn, ...)")
    pre.add_argument("--out", type=Path, required=True, help="the weights file (*.pt); the sidecar *.json beside it")
    pre.add_argument("--epochs", type=int, default=5)
    pre.add_argument("--image-size", type=int, default=32, help="the runs' image-size it is for (default 32)")
    pre.add_argument("--batch-size", type=int, default=128)
    pre.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", choices=DEVICES, default="auto")
    pre.set_defaults(handler=cmd_pretrain)

    add_deploy_commands(sub)  # certs, server, client, audit: fedhosp/deploy_cli.py
    return parser


def add_simulate_arguments(sim: argparse.ArgumentParser, out: Path = Path("runs/demo")) -> None:
    """The options of one simulation: `simulate` takes them, and `sweep` for every cell of its grid."""
    sim.add_argument("--sites", type=int, default=5, help="number of virtual hospitals (default 5)")
    sim.add_argument("--rounds", type=int, default=None, help="server rounds (default: pyproject's)")
    sim.add_argument("--out", type=Path, default=out, help=f"output folder (default {out})")
    sim.add_argument("--data", type=Path, default=None,
                     help="existing hospitals (site-000/, site-001/, ...) instead of synthetic ones; or, with "
                          "--partition or a .npz, one pool to split into sites (MedMNIST .npz, labelled folder)")
    sim.add_argument("--partition", choices=PARTITION_SCHEMES, default=None,
                     help="split one pool (--data, or synthetic) into the sites: iid, dirichlet (label skew), "
                          "quantity (size skew)")
    sim.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition (default 0.5)")
    sim.add_argument("--scanner-shift", type=float, nargs="?", const=1.0, default=0.0, metavar="STRENGTH",
                     help="each split site its own scanner (intensity, gamma, noise, blur, resolution); 1 = strong")
    sim.add_argument("--baselines", action="store_true",
                     help="also train pooled and local-only models, scored on the same held-out data")
    sim.add_argument("--engine", choices=("ray", "inprocess"), default="ray",
                     help="ray: Flower's simulation engine (default); inprocess: the same apps, one site at a time")
    sim.add_argument("--random-site-secrets", action="store_true",
                     help="DP noise from random per-site secrets, as real sites do (default: derived from --seed)")
    sim.add_argument("--task", choices=TASKS, default=None, help="classification (default) or segmentation")
    sim.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    sim.add_argument("--epsilon", type=float, default=None, help="target ε for the whole run")
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--images-per-site", type=int, default=500, help="synthetic images per site (default 500)")
    sim.add_argument("--cpus-per-site", type=float, default=1.0, help="CPU cores reserved per virtual site")
    sim.add_argument("--gpus-per-site", type=float, default=0.0, metavar="SHARE",
                     help="GPU share Ray reserves per virtual site, e.g. 0.25: four sites per GPU (default 0: CPU)")
    sim.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="run on this Ray cluster (`ray start --head` prints it; default $RAY_ADDRESS, else a Ray "
                          "of its own on this machine); data and --out on a path every node sees")
    sim.add_argument("--run-config", default="", metavar='"KEY=VALUE ..."',
                     help="any run setting, as for `flwr run --run-config`")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")


def cmd_synth(args: argparse.Namespace) -> int:
    from common.data.synthetic import write_hospitals

    started = time.monotonic()
    paths = write_hospitals(args.out, args.sites, args.seed, args.images_per_site)
    log.info("wrote %d hospitals in %.1fs:", len(paths), time.monotonic() - started)
    for p in paths:
        log.info("  %s", p)
    return 0


def simulate_config(args: argparse.Namespace) -> RunConfig:
    out = args.out
    values: dict[str, Any] = {
        "out-dir": str(out),
        "data-root": str(args.data if args.data and not splits_pool(args) else out / "hospitals"),
        "state-root": str(out / "sites"),
        "min-available-sites": max(args.sites, 1),
    }
    if args.task is not None:  # its model and schedule follow (common/config.py TASK_DEFAULTS)
        values["task"] = args.task
    if args.rounds is not None:
        values["num-server-rounds"] = args.rounds
    if args.no_dp:
        values["dp-enabled"] = False
    if args.epsilon is not None:
        values["dp-target-epsilon"] = args.epsilon
    if args.seed is not None:
        values["seed"] = args.seed
    values.update(parse_overrides(args.run_config))
    return RunConfig.from_mapping(values)  # what is not set here takes RunConfig's (and the task's) defaults


def splits_pool(args: argparse.Namespace) -> bool:
    """Split one pool into sites (--partition, --scanner-shift or an .npz) rather than use site folders."""
    if args.data is not None and args.data.suffix != ".npz" and (args.data / "site-000").is_dir():
        if args.partition or args.scanner_shift:
            raise ConfigError(f"--data {args.data} already holds site folders: --partition and --scanner-shift "
                              "split one pool (an .npz or a folder of labelled images)")
        return False
    return bool(args.partition or args.scanner_shift or (args.data is not None and args.data.suffix == ".npz"))


def ray_address(args: argparse.Namespace) -> str | None:
    """--ray-address, else $RAY_ADDRESS as Ray's own tools read it (for --engine ray only); None or
    "local": a Ray of this command's own."""
    address = args.ray_address or (os.environ.get("RAY_ADDRESS") if args.engine == "ray" else None)
    return None if address in (None, "", "local") else address


def on_shared_paths(args: argparse.Namespace) -> argparse.Namespace:
    """On a cluster the sites read and write by the paths the driver names: absolute ones, since a Ray
    worker's working folder is not the driver's."""
    if ray_address(args) is None:
        return args
    data = args.data.resolve() if args.data is not None else None
    return argparse.Namespace(**{**vars(args), "out": args.out.resolve(), "data": data})


def cmd_simulate(args: argparse.Namespace) -> int:
    print(f"results: {run_simulate(args)}")
    return 0


def run_simulate(args: argparse.Namespace) -> Path:
    """One `fedhosp simulate`, report included; returns the results.json path (`sweep` runs it per cell)."""
    from simulation import report
    from simulation.run import SimulationOptions, simulate, with_round_timeout
    from simulation.virtual_sites import PartitionOptions

    args = on_shared_paths(args)
    cfg = simulate_config(args)
    pooled = splits_pool(args)
    opts = SimulationOptions(
        sites=args.sites,
        images_per_site=args.images_per_site,
        synthesize=args.data is None,
        cpus_per_site=args.cpus_per_site,
        verbose=args.verbose,
        partition=PartitionOptions(args.partition or "iid", args.alpha, args.scanner_shift) if pooled else None,
        pool_data=args.data if pooled else None,
        baselines=args.baselines,
        derive_site_secrets=not args.random_site_secrets,
        engine=args.engine,
        ray_address=ray_address(args),
        gpus_per_site=args.gpus_per_site,
    )
    cfg = with_round_timeout(cfg, opts)
    dp = f"DP-SGD, target ε={cfg.dp_target_epsilon:g}, δ={cfg.dp_target_delta:g}" if cfg.dp_enabled else "no DP"
    where = f" on Ray cluster {opts.ray_address}" if opts.ray_address else ""
    log.info("fedhosp simulate: %d sites, %d rounds, %s with %s, %s%s", args.sites, cfg.num_server_rounds, cfg.task,
             cfg.model, dp, where)
    started = time.monotonic()
    with interrupts.ctrl_c_ends("the simulation"):  # before the engine starts any thread
        extra = simulate(cfg, opts)
    results = report.write(Path(cfg.out_dir), cfg.to_mapping(), args.sites,
                           {"seconds": round(time.monotonic() - started, 1), **extra})
    for line in report.summary_lines(results):
        log.info(line)
    return results


def cmd_sweep(args: argparse.Namespace) -> int:
    """Exit 0 when every cell ran, 1 when some failed (the table says which and why)."""
    from simulation import sweep

    table = sweep.run(args, run_simulate)
    print(f"table: {table.csv}  plot: {table.png}")
    return 0 if table.failed == 0 else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """Exit 0 on go, 1 on no-go: a script can gate round 1 on it."""
    from common.data import inventory

    report = inventory.inspect(args.data, args.task)
    print(inventory.to_json(report) if args.json else inventory.render(report))
    return 0 if report.go else 1


def cmd_ledger_show(args: argparse.Namespace) -> int:
    from common.ledger import LedgerKey, PrivacyLedger, statement

    if not args.site.is_dir():
        raise ConfigError(f"--site {args.site}: no such folder; pass the site's state folder")
    site = args.site.resolve()
    key_path = args.ledger_key or site.parent / f"{site.name}.ledger-key"
    if args.ledger_key is not None and not key_path.is_file():
        raise ConfigError(f"--ledger-key {key_path}: no such file")
    key = LedgerKey(key_path) if key_path.is_file() else None
    report = statement(PrivacyLedger(site, key))
    report["verified"] = (f"hash chain and the site's signatures verified with {key_path}" if key else
                          f"hash chain verified; signatures not checked (no ledger key at {key_path})")
    if args.budget is not None:
        report["privacy-budget"] = args.budget
        report["remaining"] = max(0.0, args.budget - report["epsilon-total"])
    print(json.dumps(report, indent=1) if args.json else format_ledger(report))
    return 0


def format_ledger(report: dict[str, Any]) -> str:
    head = f"{'run':<24} {'round':>5} {'sigma':>7} {'q':>8} {'steps':>6} {'delta':>8} {'eps run':>8} " \
           f"{'eps total':>9}  time"
    lines = [f"privacy ledger {report['ledger']}: {len(report['rounds'])} DP rounds in {len(report['runs'])} run(s), "
             f"{report['verified']}", head]
    for r in report["rounds"]:
        lines.append(f"{r['run'][:24]:<24} {r['round']:>5} {r['noise_multiplier']:>7.3f} {r['sample_rate']:>8.4f} "
                     f"{r['steps']:>6} {r['delta']:>8.0e} {r['epsilon-run']:>8.3f} {r['epsilon-total']:>9.3f}  "
                     f"{r['time']}")
    total = f"total ε = {report['epsilon-total']:.3f} at δ = {report['delta']:g} (Opacus RDP over every round above)"
    if "privacy-budget" in report:
        total += f"; budget {report['privacy-budget']:g}, remaining {report['remaining']:.3f}"
    return "\n".join([*lines, total])


def cmd_predict(args: argparse.Namespace) -> int:
    from client.predict import PredictOptions, predict, summary

    opts = PredictOptions(model=args.model, data=args.data, out=args.out, labels=args.labels,
                          explain=args.explain, device=args.device)
    result = predict(opts)
    print(f"model card ({args.model}):")
    for line in result.card.lines():
        print(f"  {line}")
    for line in summary(result):
        print(line)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from simulation.pretrain import PretrainOptions, pretrain, sidecar

    card = pretrain(PretrainOptions(data=args.data, model=args.model, out=args.out, epochs=args.epochs,
                                    image_size=args.image_size, batch_size=args.batch_size,
                                    learning_rate=args.lr, seed=args.seed, device=args.device))
    test = card["test"]
    scored = f"; its test split: accuracy {test['accuracy']:.3f}, AUC {test['auc']:.3f}" if test else ""
    print(f"{card['model']} on {card['pool-source']}: {card['epochs']} epochs in {card['seconds']:.0f}s{scored}")
    print(f"weights: {args.out} (sha256 {card['sha256'][:16]}...)  sidecar: {sidecar(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
