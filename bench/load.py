"""Load: `fedhosp server` and 20 `fedhosp client`s on 127.0.0.1, one of them sending garbage every round.

Everything as a consortium runs it: a SuperLink with TLS and SuperNode authentication behind nginx
with mutual TLS, each site provisioned with `fedhosp certs site` + `fedhosp certs sign` and reaching
the coordinator through its site tunnel (fedhosp/site_tunnel.py). The smallest model (the default
cnn at 32 px), tiny synthetic sites, one local epoch; every site trains and a tenth of them evaluate
(fraction-evaluate 0.1: the run settings accept no 0; a garbage evaluate reply is rejected too). One
site's ClientApp is replaced, by its own environment only (bench/garbage_site/sitecustomize.py),
with one that answers every message with a malformed reply: the run must finish every round with
that reply rejected each time. Recorded: each round's wall time (the ServerApp's), the sites
accepted and rejected per round with the reason class, the coordinator's peak resident memory (the
`fedhosp server` process tree: SuperLink, nginx, `flwr run`, the ServerApp), each site's peak (its
`fedhosp client` tree: tunnel, SuperNode, SuperExec, clientapp zygote and the task it forked), the
machine's memory in use and its load average, sampled every second; and where a site's message
spent its time (bench/deployment.py `phases`).

The sites run `fedhosp client` as shipped: the warm zygote (fedhosp/warm_clientapp.py) imports
torch & co. once per site, and every task is a fork of it. Each site runs in a PID namespace of its
own (`unshare`, as on a machine of its own; network, files and CPUs shared): `fedhosp client` checks
on its children by reading all of /proc (five times a second per child when these figures were taken;
once a second since, fedhosp/hospital.py REFRESH_TICKS), so on one host its cost grows
with every other site's processes (measured: 0.7% of a core per site in its own namespace; 5% per site
with 6 sites sharing one, 4-12% each with 20 in a run that took 181 s for round 1 and was stopped
in round 2 at 560 s: `--shared-pid-namespace`). Sites start all at once by default; `--warming N` staggers them (a site
starts when fewer than N earlier ones are still importing torch): 20 sites were warm after 393 s two
at a time (one shared namespace), after 153 s all at once (a namespace each). `--stock-clientapp`
runs Flower's own clientapp instead (a fresh interpreter per message, no zygote). A site's RSS
counts pages it shares with other sites (libtorch's code is mapped by every zygote), so the sites'
summed RSS overstates what 20 sites cost: the machine's memory in use above its level before the
start is the honest total, and every site's proportional share (PSS, sampled every 15 s) is recorded
beside it. CPU seconds are summed per kind of process (`cpu_s`, and cumulatively in `series`): where
the time goes. The run is stopped (and says so) if the machine's available memory falls under
MIN_AVAILABLE_GIB, before the OOM killer would pick a process.

If the run does not end within `--timeout`, everything is stopped and the figures so far are
written with `completed` false and a `stall` entry saying what each side had done by then.

Usage: python -m bench.load [--sites 20] [--rounds 3] [--images 100] [--warming 0] [--timeout 600] [--out FILE]
       [--shared-pid-namespace] [--stock-clientapp] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from bench.deployment import ROOT, _stop, phases, provision
from common import flower_env
from common.data.synthetic import write_hospitals
from fedhosp import processes
from server import runlog

GARBAGE = Path(__file__).resolve().parent / "garbage_site"  # on the garbage site's PYTHONPATH only
WARM_LINE = "clientapp libraries loaded"  # the zygote's line once torch & co. are imported (warm_clientapp.main)
WARM_WAIT_S = 120.0  # the longest a site start waits for earlier sites to finish importing
# Stop the run (and say so) before the kernel's OOM killer picks a process, maybe another user's.
MIN_AVAILABLE_GIB = 1.0
RUN_CONFIG = "local-epochs=1 fraction-evaluate=0.1 dp-target-epsilon=8.0 batch-size=16"  # 2 of 20 sites evaluate


# A hospital's processes in a PID namespace of their own, as on a machine of its own: `fedhosp client`
# watches its children through /proc, and on one host with 20 sites it would read 20 sites' processes.
NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"]


def _fedhosp(args: list[str], log: Path, extra_env: dict[str, str] | None = None,
             prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **flower_env.DEPLOYMENT, **(extra_env or {})}
    with open(log, "w") as out:
        return subprocess.Popen([*(prefix or []), sys.executable, "-m", "fedhosp.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)


def namespaces_work() -> bool:
    """Whether this machine lets us give each site a PID namespace (root, or user namespaces allowed)."""
    try:
        return subprocess.run([*NAMESPACE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


TICK = os.sysconf("SC_CLK_TCK")
# What a process is, from its command line: the first keyword found names its kind (`cpu_s` in the results).
KINDS = (("fedhosp.cli client", "fedhosp client"), ("fedhosp.site_tunnel", "site tunnel"),
         ("flower-supernode", "SuperNode"), ("flower-superexec", "SuperExec"),
         ("fedhosp.warm_clientapp", "clientapp zygote"),
         ("flwr-clientapp", "clientapp task"), ("approved_code", "clientapp task"),
         ("flower-superlink", "SuperLink"), ("nginx", "nginx"), ("flwr-serverapp", "ServerApp"),
         ("fedhosp.cli server", "fedhosp server"), ("flwr run", "flwr run"))


def _scan() -> tuple[dict[int, list[int]], dict[int, tuple[int, int]]]:
    """One pass over /proc: parent pid -> its live children, and pid -> (parent, CPU ticks used)."""
    kids: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            kids.setdefault(int(fields[1]), []).append(int(entry.name))
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return kids, stats


def _kind(pid: int, parent_kind: str | None) -> str:
    """A process's kind (KINDS); a fork of the zygote carries its command line but is a task, and a
    SuperExec is the site's or the coordinator's by whom it serves."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    kind = next((name for key, name in KINDS if key in cmdline), "other")
    if kind == "SuperExec":
        return "SuperExec (site)" if parent_kind == "SuperNode" else "SuperExec (coordinator)"
    return "clientapp task" if kind == "clientapp zygote" and parent_kind == "clientapp zygote" else kind


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    found, todo = [pid], [pid]
    while todo:
        for kid in kids.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


def _meminfo_kib() -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}


def _mem_used_kib() -> int:
    info = _meminfo_kib()
    return info["MemTotal"] - info["MemAvailable"]


class Sampler(threading.Thread):
    """Peak summed RSS (and PSS, less often) of named process trees, the machine's memory in use and its
    load average, sampled every `every` seconds until stopped; a coarse time series beside the peaks."""

    def __init__(self, every: float = 1.0, pss_every: float = 15.0, series_every: float = 10.0,
                 min_available_gib: float = MIN_AVAILABLE_GIB) -> None:
        super().__init__(daemon=True)
        self.roots: dict[str, int] = {}
        self.rss: dict[str, int] = {}
        self.largest: dict[str, int] = {}
        self.pss: dict[str, int] = {}
        self.every, self.pss_every, self.series_every = every, pss_every, series_every
        self.baseline_kib = _mem_used_kib()
        self.mem_peak_kib, self.load_peak = self.baseline_kib, os.getloadavg()[0]
        self.series: list[dict[str, Any]] = []
        self.kinds: dict[int, str] = {}  # pid -> its kind, once seen
        self.ticks: dict[int, int] = {}  # pid -> the CPU ticks it had used when last seen
        self.started = time.monotonic()
        self.done = threading.Event()
        self.low_memory = threading.Event()  # set when the machine's available memory fell below the floor
        self.min_available_kib = int(min_available_gib * 2**20)
        self.lock = threading.Lock()

    def watch(self, name: str, pid: int) -> None:
        with self.lock:
            self.roots[name] = pid

    def run(self) -> None:
        last_pss = last_series = -1e9
        while not self.done.is_set():
            now = time.monotonic()
            kids, stats = _scan()
            with self.lock:
                roots = dict(self.roots)
            pss_due = now - last_pss >= self.pss_every
            for name, pid in roots.items():
                tree = _tree(pid, kids)
                self.account(tree, stats)
                sizes = [_status_kib(p, "VmRSS:") for p in tree]
                self.rss[name] = max(self.rss.get(name, 0), sum(sizes))
                self.largest[name] = max(self.largest.get(name, 0), max(sizes))
                if pss_due:
                    self.pss[name] = max(self.pss.get(name, 0), sum(_pss_kib(p) for p in tree))
            last_pss = now if pss_due else last_pss
            info, load = _meminfo_kib(), os.getloadavg()[0]
            used = info["MemTotal"] - info["MemAvailable"]
            if info["MemAvailable"] < self.min_available_kib:
                self.low_memory.set()
            self.mem_peak_kib, self.load_peak = max(self.mem_peak_kib, used), max(self.load_peak, load)
            if now - last_series >= self.series_every:
                self.series.append({"t": round(now - self.started, 1), "load1": load,
                                    "mem_used_gib": round(used / 2**20, 2), "cpu_s": self.cpu_s()})
                last_series = now
            self.done.wait(self.every)


    def account(self, tree: list[int], stats: dict[int, tuple[int, int]]) -> None:
        """Note each process's kind (once) and the CPU it has used so far."""
        for pid in tree:
            if pid not in stats:
                continue
            parent, ticks = stats[pid]
            if pid not in self.kinds:
                self.kinds[pid] = _kind(pid, self.kinds.get(parent))
            self.ticks[pid] = ticks

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by every kind of process (those that exited: up to their last sample)."""
        total: dict[str, float] = {}
        for pid, ticks in self.ticks.items():
            total[self.kinds[pid]] = total.get(self.kinds[pid], 0.0) + ticks / TICK
        return {k: round(v, 1) for k, v in sorted(total.items())}


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def start_site(work: Path, name: str, index: int, data: Path, fleet: int, stock: bool,
               garbage: bool, namespace: bool) -> subprocess.Popen[bytes]:
    """One hospital's `fedhosp client`, dialling from an address of its own (127.0.0.{index + 2}), as
    hospitals do: nginx's per-address limits (fedhosp/fleet_proxy.py) are for one site or one NAT."""
    return _fedhosp(["client", "--server", f"127.0.0.1:{fleet}", "--ca", str(work / "certs" / "ca.crt"),
                     "--key", str(work / name / f"{name}.key"), "--data", str(data), "--device", "cpu",
                     "--runtime-port", str(processes.free_port()), "--tunnel-port", str(processes.free_port()),
                     "--source-address", f"127.0.0.{index + 2}", *(["--stock-clientapp"] if stock else [])],
                    work / f"{name}.log", {"PYTHONPATH": str(GARBAGE)} if garbage else None,
                    NAMESPACE if namespace else None)


def stop_site(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM to the site's `fedhosp client` itself (in a namespace: the child of `unshare`, which
    would otherwise die first and take it down unannounced), then bench/deployment.py's `_stop`."""
    kids, _ = _scan()
    for pid in kids.get(proc.pid, []):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    _stop(proc)


def _warm(log: Path) -> bool:
    try:
        return WARM_LINE in log.read_text(errors="replace")
    except OSError:
        return False


def wait_warming(logs: list[Path], warming: int, deadline: float, stop: threading.Event) -> None:
    """Until fewer than `warming` of the sites' zygotes are still importing, `deadline` passes or `stop` is set."""
    while sum(not _warm(log) for log in logs) >= warming and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.5)


def stop_all(server: subprocess.Popen[bytes], sites: list[subprocess.Popen[bytes]], namespace: bool) -> None:
    """Every process stopped at once: 20 sites one after the other take minutes."""
    threads = [threading.Thread(target=_stop, args=(server,)),
               *(threading.Thread(target=stop_site if namespace else _stop, args=(p,)) for p in sites)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_server(server: subprocess.Popen[bytes], deadline: float, sampler: Sampler) -> int | None:
    """The server's exit status, or None if `deadline` passed or the machine ran short of memory first."""
    while time.monotonic() < deadline and not sampler.low_memory.is_set():
        try:
            return server.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            continue
    return None


def _tail(path: Path, n: int = 5) -> list[str]:
    try:
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-n:]
    except OSError:
        return []


def stall(work: Path, names: list[str], out: Path) -> dict[str, Any]:
    """What each side had done when the run was stopped: rounds logged, sites warm, messages each site
    received and answered, and the last lines of the coordinator's logs."""
    site_logs = {n: work / n / "state" / "supernode.log" for n in names}

    def count(path: Path, text: str) -> int:
        try:
            return path.read_text(errors="replace").count(text)
        except OSError:
            return 0

    return {"rounds_logged": len(runlog.read(out / runlog.RUN_LOG)) if (out / runlog.RUN_LOG).is_file() else 0,
            "sites_warm": sum(_warm(work / f"{n}.log") for n in names),
            "messages_received": [count(p, "Received successfully") for p in site_logs.values()],
            "replies_sent": [count(p, "Sent successfully") for p in site_logs.values()],
            "server_log_tail": _tail(work / "server.log", 8),
            "run_log_tail": _tail(out / "coordinator" / "run.log", 8),
            "superlink_log_tail": _tail(out / "coordinator" / "superlink.log", 4)}


def where_time_goes(work: Path, names: list[str]) -> dict[str, float]:
    """The sites' median seconds per train message phase (bench/deployment.py `phases`), over the honest sites."""
    per_site = [phases(work / n / "state" / "supernode.log").get("train", {}) for n in names]
    keys = sorted({k for p in per_site for k in p})
    return {k: round(statistics.median([p[k] for p in per_site if k in p]), 2) for k in keys}


def measure(root: Path, sites: int, rounds: int, images: int, warming: int, timeout: float,
            stock: bool = False, namespace: bool = True, with_garbage: bool = True) -> dict[str, Any]:
    """`with_garbage` False: every site honest, the baseline that prices the garbage site."""
    namespace = namespace and namespaces_work()
    work = root / "load"
    names = provision(work, sites)
    data = write_hospitals(work / "data", num_sites=sites, seed=3, images_per_site=images)
    garbage = names[-1] if with_garbage else None
    fleet, control = processes.free_port(), processes.free_port()
    out = work / "run"
    sampler = Sampler()
    sampler.start()
    started = time.monotonic()
    deadline = started + timeout
    server = _fedhosp(["server", "--certs", str(work / "certs"), "--sites", str(work / "pubs"),
                       "--rounds", str(rounds), "--out", str(out), "--listen", f"127.0.0.1:{fleet}",
                       "--control-port", str(control), "--min-sites", str(sites), "--site-wait", str(int(timeout)),
                       "--round-timeout", "300", "--run-config", RUN_CONFIG], work / "server.log")
    sampler.watch("coordinator", server.pid)
    clients: list[subprocess.Popen[bytes]] = []
    site_started: list[float] = []
    code: int | None = None
    all_warm: float | None = None
    try:
        with processes.stopping_on_sigterm():
            for i, name in enumerate(names):
                if not stock:
                    wait_warming([work / f"{n}.log" for n in names[:i]], warming,
                                 min(deadline, time.monotonic() + WARM_WAIT_S), sampler.low_memory)
                clients.append(start_site(work, name, i, data[i], fleet, stock, name == garbage, namespace))
                sampler.watch(name, clients[-1].pid)
                site_started.append(time.monotonic() - started)
                if stock:
                    time.sleep(1.0)
                if sampler.low_memory.is_set():
                    break
            if not stock:
                wait_warming([work / f"{n}.log" for n in names], 1, deadline, sampler.low_memory)
                all_warm = time.monotonic() - started
            code = wait_server(server, deadline, sampler)
    except KeyboardInterrupt:
        code = None
    finally:
        total = time.monotonic() - started
        stalled = stall(work, names, out) if code != 0 else None
        stop_all(server, clients, namespace)
        sampler.done.set()
        sampler.join(timeout=5)
    if code not in (0, None):
        raise RuntimeError(f"fedhosp server exited {code}: {' | '.join(_tail(work / 'server.log'))}")
    records = runlog.read(out / runlog.RUN_LOG) if (out / runlog.RUN_LOG).is_file() else []
    garbage_said = (work / f"{garbage}.log").read_text(errors="replace").count("garbage site: round") if garbage else 0
    honest = [n for n in names if n != garbage]
    site_rss = [sampler.rss.get(n, 0) for n in names]
    result = {
        "sites": sites, "rounds": rounds, "images_per_site": images, "model": "cnn", "image_size": 32,
        "clientapp": "stock" if stock else "warm zygote", "warming": warming, "timeout_s": timeout,
        "pid_namespace_per_site": namespace, "garbage_site": garbage,
        "total_s": round(total, 1), "sites_started_s": [round(t, 1) for t in site_started],
        "all_sites_warm_s": None if all_warm is None else round(all_warm, 1),
        "round_s": [float(r["seconds"]) for r in records],
        "sites_ok": [r["sites_ok"] for r in records],
        "sites_rejected": [r["sites_rejected"] for r in records],
        "rejected_reasons": [[{"class": x.get("class"), "reason": x.get("reason")} for x in r.get("rejected", [])]
                             for r in records],
        "garbage_replies_sent": garbage_said,
        "coordinator_peak_rss_mib": _mib(sampler.rss.get("coordinator", 0)),
        "coordinator_largest_process_rss_mib": _mib(sampler.largest.get("coordinator", 0)),
        "coordinator_peak_pss_mib": _mib(sampler.pss.get("coordinator", 0)),
        "site_peak_rss_mib": {"median": _mib(int(statistics.median(site_rss))), "max": _mib(max(site_rss))},
        "site_largest_process_rss_mib": _mib(max(sampler.largest.get(n, 0) for n in names)),
        "sites_peak_pss_mib_sum": _mib(sum(sampler.pss.get(n, 0) for n in names)),
        "machine_mem_used_gib": {"before": round(sampler.baseline_kib / 2**20, 2),
                                 "peak": round(sampler.mem_peak_kib / 2**20, 2),
                                 "peak_above_before": round((sampler.mem_peak_kib - sampler.baseline_kib) / 2**20, 2)},
        "load_average": {"before": sampler.series[0]["load1"] if sampler.series else None,
                         "peak_1min": round(sampler.load_peak, 2), "cores": os.cpu_count()},
        "cpu_s": sampler.cpu_s(),
        "series": sampler.series,
        "train_message_phases_s": where_time_goes(work, honest),
        "completed": [r["round"] for r in records] == list(range(1, rounds + 1)),
    }
    if stalled is not None:
        result["stall"] = {**stalled, "low_memory": sampler.low_memory.is_set(),
                           "sites_started": len(clients)}
    return result


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """bench/table.py's rows for this section."""
    ok = r["completed"] and all(n >= 1 for n in r["sites_rejected"])
    return [("load", f"{r['sites']} sites over mTLS, one sending garbage: rounds completed, rejected per round",
             f"{len(r['round_s'])}/{r['rounds']}, {r['sites_rejected']}", "all, >= 1 each", "met" if ok else "MISSED"),
            ("load", "round wall time (s)", ", ".join(f"{x:.1f}" for x in r["round_s"]), "", ""),
            ("load", "coordinator peak RSS (MiB, whole tree)", f"{r['coordinator_peak_rss_mib']:.0f}", "", ""),
            ("load", "site peak RSS (MiB, median / max); all sites' PSS (MiB)",
             f"{r['site_peak_rss_mib']['median']:.0f} / {r['site_peak_rss_mib']['max']:.0f}; "
             f"{r['sites_peak_pss_mib_sum']:.0f}", "", ""),
            ("load", "peak load average (1 min)", f"{r['load_average']['peak_1min']:.1f}", "", "")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=100,
                        help="synthetic images per site (100: the 20 a site holds out reach its min-validation-images)")
    parser.add_argument("--warming", type=int, default=0,
                        help="start a site when fewer than this many are still importing torch (0: all at once)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="stop everything after this many seconds and report where it stalled")
    parser.add_argument("--shared-pid-namespace", action="store_true",
                        help="every site's processes in this machine's PID namespace (default: one per site)")
    parser.add_argument("--stock-clientapp", action="store_true",
                        help="Flower's own clientapp at every site (a fresh interpreter per message)")
    parser.add_argument("--no-garbage", action="store_true",
                        help="every site honest: the baseline that prices what the garbage site costs")
    parser.add_argument("--work", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    processes.become_subreaper()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.work or Path(tmp), args.sites, args.rounds, args.images, args.warming or args.sites,
                         args.timeout, args.stock_clientapp, not args.shared_pid_namespace, not args.no_garbage)
    print(f"{result['sites']} sites, {result['rounds']} rounds: round times "
          f"{[round(x, 1) for x in result['round_s']]} s, accepted {result['sites_ok']}, rejected "
          f"{result['sites_rejected']} per round; coordinator peak RSS {result['coordinator_peak_rss_mib']} MiB; "
          f"site peak RSS {result['site_peak_rss_mib']} MiB; load peak {result['load_average']['peak_1min']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if not result["completed"] or (not args.no_garbage and any(n < 1 for n in result["sites_rejected"])):
        raise SystemExit(f"the run did not complete every round with the garbage site rejected: "
                         f"{json.dumps(result.get('stall', {}))}")
    return result


if __name__ == "__main__":
    main()
