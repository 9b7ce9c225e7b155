"""The deployment commands of `fedhosp`: `certs init|site|sign`, `server`, `client`, `audit show`.

Kept apart from fedhosp/cli.py so that the parser stays one screen per concern; the
handlers import their modules lazily, like the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.config import DEVICES

DEFAULT_LISTEN = "0.0.0.0:9092"
DEFAULT_CONTROL_PORT = 9093
DEFAULT_RUNTIME_PORT = 9094
DEFAULT_TUNNEL_PORT = 9095


def add_deploy_commands(sub: Any) -> None:
    certs = sub.add_parser("certs", help="provisioning: the consortium CA, the server certificate, site keys")
    certs_sub = certs.add_subparsers(required=True, metavar="ACTION")
    init = certs_sub.add_parser("init", help="create a CA and the coordinator's TLS certificate")
    init.add_argument("--out", type=Path, required=True,
                      help="folder for ca.crt, server.crt, server.key (the CA key goes to OUT-ca/ca.key, never here)")
    init.add_argument("--server-name", required=True, metavar="HOST[,IP...]",
                      help="every host name and IP address hospitals use to reach the coordinator")
    init.set_defaults(handler=cmd_certs_init)
    site = certs_sub.add_parser("site", help="create a hospital's key pair and certificate request (run it at the "
                                             "hospital)")
    site.add_argument("name", metavar="NAME", help="the site's name, e.g. st-marys")
    site.add_argument("--out", type=Path, required=True,
                      help="the site's own folder: NAME.key stays there; NAME.pub and NAME.csr go to the coordinator")
    site.set_defaults(handler=cmd_certs_site)
    sign = certs_sub.add_parser("sign", help="sign a hospital's NAME.csr: its client certificate (at the coordinator)")
    sign.add_argument("request", type=Path, metavar="NAME.csr", help="the request `fedhosp certs site` wrote")
    sign.add_argument("--ca-dir", type=Path, required=True,
                      help="the CA's own folder (OUT-ca/ from `certs init`: ca.key), kept offline")
    sign.add_argument("--out", type=Path, required=True, help="folder for NAME.crt (send it back to the hospital)")
    sign.set_defaults(handler=cmd_certs_sign)

    server = sub.add_parser("server", help="coordinate a real federation: SuperLink + TLS + authenticated sites")
    server.add_argument("--certs", type=Path, required=True, help="the folder `fedhosp certs init` wrote")
    server.add_argument("--sites", type=Path, required=True, help="folder of the hospitals' NAME.pub files")
    server.add_argument("--rounds", type=int, required=True, help="server rounds")
    server.add_argument("--out", type=Path, default=Path("runs/server"),
                        help="run folder: model.pt, checkpoints, run log, Flower's logs (default runs/server)")
    server.add_argument("--resume", action="store_true",
                        help="continue the run stopped in --out at the round after its last checkpoint")
    server.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"the hospitals' address: Fleet API only, through nginx (default {DEFAULT_LISTEN})")
    server.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                        help=f"the SuperLink's port on 127.0.0.1, never exposed (default {DEFAULT_CONTROL_PORT})")
    server.add_argument("--min-sites", type=int, default=None, help="sites needed per round (min-available-sites)")
    server.add_argument("--site-wait", type=float, default=None,
                        help="seconds to wait for --min-sites sites before giving up (site-wait)")
    server.add_argument("--round-timeout", type=float, default=None,
                        help="seconds a round waits for replies; late sites are left out (round-timeout)")
    server.add_argument("--run-config", default="", metavar='"KEY=VALUE ..."',
                        help="any run setting, as for `flwr run --run-config` (TOML values: strings quoted)")
    server.add_argument("--app", type=Path, default=None,
                        help="the fedhosp source folder (with pyproject.toml) to submit; default: this install's")
    server.add_argument("--nginx", default=None, metavar="PATH", help="the nginx binary (default: from PATH)")
    server.set_defaults(handler=cmd_server)

    client = sub.add_parser("client", help="join a federation as a hospital (a Flower SuperNode)")
    client.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's hospital address")
    client.add_argument("--ca", type=Path, required=True, help="the consortium's ca.crt")
    client.add_argument("--key", type=Path, required=True, help="this site's NAME.key (from `fedhosp certs site`)")
    client.add_argument("--cert", type=Path, default=None,
                        help="this site's client certificate, signed by the consortium CA (`fedhosp certs sign`; "
                             "default: NAME.crt beside --key)")
    client.add_argument("--data", type=Path, required=True, help="this site's data folder")
    client.add_argument("--state", type=Path, default=None,
                        help="this site's state folder: privacy ledger, audit log, cache (default: state/ beside "
                             "--key)")
    client.add_argument("--device", choices=DEVICES, default="auto")
    client.add_argument("--privacy-budget", type=float, default=None,
                        help="this site's total ε over every run on its data (default 10; must be > 0)")
    client.add_argument("--policy", default="", metavar='"KEY=VALUE ..."',
                        help="this site's own privacy floor and resource caps, e.g. \"dp-delta=1e-5 "
                             "max-image-size=512 allow-no-dp=false\" (keys: docs/hospital.md)")
    client.add_argument("--allow-app", action="append", default=[], metavar="SHA256",
                        help="also run this app bundle (its digest, as a refusal prints it) after you reviewed it; "
                             "by default the site runs only the fedhosp code installed here (repeatable)")
    client.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT,
                        help=f"the SuperNode's local Runtime API port on 127.0.0.1 (default {DEFAULT_RUNTIME_PORT})")
    client.add_argument("--tunnel-port", type=int, default=None,
                        help="the site tunnel's port on 127.0.0.1, which carries the SuperNode's calls to --server "
                             f"with the client certificate (default: --runtime-port + 1, {DEFAULT_TUNNEL_PORT})")
    client.add_argument("--source-address", default=None, metavar="IP",
                        help="the local address to reach --server from (a host with several; default: any)")
    client.add_argument("--max-wait", type=float, default=None,
                        help="give up after this many seconds without the server (default: keep trying)")
    client.add_argument("--stock-clientapp", action="store_true",
                        help="start Flower's own flwr-clientapp for every task (a fresh interpreter importing torch "
                             "each time: ~10 s a message) instead of forking it from one that imported them once")
    client.add_argument("--stock-waits", action="store_true",
                        help="run the SuperNode with Flower's own fixed waits (a 3 s sleep whenever it finds no "
                             "task: ~6 s a round) instead of fedhosp's shorter ones (common/flower_compat/waits.py)")
    client.add_argument("--dry-run", action="store_true",
                        help="print the environment and every command this site would run, exactly, and start nothing")
    client.set_defaults(handler=cmd_client)

    audit = sub.add_parser("audit", help="a site's audit trail: every run it joined")
    audit_sub = audit.add_subparsers(required=True, metavar="ACTION")
    show = audit_sub.add_parser("show", help="one line per run: rounds, ε, app hash")
    show.add_argument("--state", type=Path, required=True, help="the site's state folder")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_audit_show)


def cmd_certs_init(args: argparse.Namespace) -> int:
    from fedhosp import certs

    made = certs.init(args.out, certs.server_names(args.server_name))
    print(f"CA: {made.ca_cert} (give to every hospital) and {made.ca_key} (keep offline)")
    print(f"server: {made.cert}, {made.key} (stay on the coordinator)")
    return 0


def cmd_certs_site(args: argparse.Namespace) -> int:
    from fedhosp import certs

    keys = certs.site(args.name, args.out)
    print(f"private key: {keys.private} (stays here, mode 0600)")
    print(f"public key:  {keys.public} (send it to the coordinator, for `fedhosp server --sites`)")
    print(f"certificate request: {keys.request} (send it too; the coordinator returns {keys.certificate.name}, "
          f"which goes beside the key)")
    return 0


def cmd_certs_sign(args: argparse.Namespace) -> int:
    from fedhosp import certs

    made = certs.sign(args.request, args.ca_dir, args.out)
    print(f"client certificate: {made} (send it to the hospital: it goes beside {made.stem}.key)")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from common.config import parse_overrides
    from fedhosp import coordinator, processes

    extra = parse_overrides(args.run_config)
    for key, value in (("min-available-sites", args.min_sites), ("site-wait", args.site_wait),
                       ("round-timeout", args.round_timeout)):
        if value is not None:
            extra[key] = value
    opts = coordinator.ServerOptions(
        certs=args.certs, sites=args.sites, rounds=args.rounds, out=args.out, app=args.app or _source_root(),
        resume=args.resume, listen=args.listen, control_port=args.control_port, run_config=extra, nginx=args.nginx,
    )
    processes.become_subreaper()
    try:
        model = coordinator.serve(opts)
    finally:
        processes.stop_strays()
    print(f"global model: {model}")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from common.config import parse_overrides
    from fedhosp import hospital, processes

    budget = hospital.DEFAULT_PRIVACY_BUDGET if args.privacy_budget is None else args.privacy_budget
    processes.become_subreaper()
    try:
        hospital.join(hospital.ClientOptions(
            server=args.server, ca=args.ca, key=args.key, data=args.data, state=args.state, device=args.device,
            privacy_budget=budget, policy=parse_overrides(args.policy), runtime_port=args.runtime_port,
            cert=args.cert, tunnel_port=args.tunnel_port, source_address=args.source_address,
            allow_apps=tuple(args.allow_app),
            max_wait=args.max_wait, warm=not args.stock_clientapp, short_waits=not args.stock_waits,
            dry_run=args.dry_run,
        ))
    finally:
        processes.stop_strays()
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    from client import audit

    runs = audit.summary(args.state)
    if args.json:
        print(json.dumps(runs, indent=1))
        return 0
    print(f"{'run':<22} {'first seen':<20} {'rounds':>6} {'evals':>5} {'refused':>7} {'eps run':>8} "
          f"{'eps total':>9}  app")
    for r in runs:
        print(f"{r['run-id']:<22} {r['first'][:19]:<20} {len(r['rounds']):>6} {r['evaluations']:>5} "
              f"{r['refused']:>7} {_num(r['epsilon']):>8} {_num(r['epsilon-total']):>9}  {r['app']}")
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _source_root() -> Path:
    """The folder holding fedhosp's pyproject.toml: what `flwr run` packs into the app bundle."""
    return Path(__file__).resolve().parents[1]
