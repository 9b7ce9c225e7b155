"""`make bench`: every benchmark in bench/, one table, and bench/results.json with the machine's description.

Each section runs in a fresh process (`python -m bench.<section> ... --out FILE`), so no
section's memory, threads or Ray state leak into the next; this process becomes the
subreaper of everything they start and stops whatever is left after each (no Ray or Flower
process outlives the benchmark). The load average is recorded before every section: on a
shared machine, a figure measured under load is noise, and the table says so.

Usage: python -m bench [--quick] [--only dp_overhead,framework,...] [--out bench/results.json]
       [--page docs/performance.md]  (the page is written from the results: bench/performance_doc.py)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import load, machine, performance_doc, quality, secagg, secagg_deployment, table
from fedhosp import processes

# Arguments per section: (full pass, --quick pass). Full: ~17 minutes on 2 idle cores, plus the venv on a fresh clone.
SECTIONS: dict[str, tuple[list[str], list[str]]] = {
    "dp_overhead": (["--repeats", "4"], ["--repeats", "3"]),
    "hardware": (["--repeats", "4"], ["--repeats", "3"]),
    "decoding": (["--images", "500", "--repeats", "5"], ["--images", "200", "--repeats", "3"]),
    "communication": (["--sites", "3", "--rounds", "6", "--images", "200", "--seeds", "0,1"],
                      ["--sites", "3", "--rounds", "4", "--images", "60", "--seeds", "0"]),
    "membership": ([], ["--rounds", "4", "--images", "60", "--local-epochs", "3"]),
    "framework": (["--sites", "10", "--rounds", "3", "--images", "200"],
                  ["--sites", "10", "--rounds", "3", "--images", "60"]),
    "deployment": (["--sites", "2", "--rounds", "2", "--images", "200", "--import-repeats", "1"],
                   ["--sites", "2", "--rounds", "2", "--images", "60", "--import-repeats", "1"]),
    "scaling": (["--sizes", "10,50,100", "--rounds", "2", "--images", "40"],
                ["--sizes", "10,100", "--rounds", "2", "--images", "20"]),
    # BreastMNIST under DP, every recipe x 3 seeds, no new run after 60 min (all of it, by hand: python -m
    # bench.quality, hours on 2 cores); quick: two recipes, one seed, 2 rounds
    "quality": (["--seeds", "0,1,2", "--stop-after-min", "60"],
                ["--seeds", "0", "--recipes", ",".join(quality.QUICK), "--rounds", "2"]),
    # 20 `fedhosp client`s over mutual TLS, one sending garbage every round (bench/load.py; ~5 min on 2 cores, 19 GiB)
    "load": (["--sites", "20", "--rounds", "3", "--images", "100"],
             ["--sites", "20", "--rounds", "3", "--images", "100"]),
    # a SecAgg+ round / a plain round, 5 sites, same model, in-process (bench/secagg.py)
    "secagg": (["--repeats", "3"], ["--repeats", "2"]),
    # the same in deployment: `fedhosp server` + 5 `fedhosp client`s, plain then SecAgg+ (bench/secagg_deployment.py)
    "secagg_deployment": (["--sites", "5", "--rounds", "4", "--images", "100"],
                          ["--sites", "5", "--rounds", "3", "--images", "100"]),
}
TIMEOUT_S = 1800
SECTION_TIMEOUT_S = {"quality": 3 * 3600}  # its own --stop-after-min ends it first
table.ROWS.setdefault("quality", quality.rows)
table.ROWS.setdefault("load", load.rows)  # the section's rows live beside it (bench/quality.py)
table.ROWS.setdefault("secagg", secagg.rows)
table.ROWS.setdefault("secagg_deployment", secagg_deployment.rows)


def run_section(name: str, args: list[str], folder: Path) -> dict[str, Any]:
    """Run one section in a fresh process; its JSON, or why it failed. Stops whatever it left behind."""
    out, log = folder / f"{name}.json", folder / f"{name}.log"
    started, timeout = time.monotonic(), SECTION_TIMEOUT_S.get(name, TIMEOUT_S)
    with open(log, "w") as f:
        try:
            code: int | str = subprocess.run([sys.executable, "-m", f"bench.{name}", *args, "--out", str(out)],
                                             stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout}s"
    processes.stop_strays()
    seconds = round(time.monotonic() - started, 1)
    if code == 0 and out.is_file():
        return {**json.loads(out.read_text()), "seconds": seconds}
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return {"error": f"exit {code}", "log_tail": tail, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller settings: a few minutes, noisier figures")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.json")
    parser.add_argument("--page", type=Path, default=performance_doc.PAGE,
                        help="the Markdown page written from the results (default docs/performance.md)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    processes.become_subreaper()
    results: dict[str, Any] = {"machine": machine.describe(), "quick": args.quick, "sections": {}, "load": {}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedhosp-bench-") as tmp:
        for name in names:
            section_args = SECTIONS[name][1 if args.quick else 0]
            results["load"][name] = machine.load()
            print(f"[bench] {name} {' '.join(section_args)} (load {results['load'][name][0]:.1f}) ...", flush=True)
            results["sections"][name] = run_section(name, section_args, Path(tmp))
            print(f"[bench] {name}: {results['sections'][name]['seconds']:.0f}s", flush=True)
    results["load"]["end"] = machine.load()
    results["seconds"] = round(time.monotonic() - started, 1)
    rows = table.rows(results["sections"])
    results["table"] = [list(r) for r in rows]
    m = results["machine"]
    loads = [v[0] for v in results["load"].values()]
    print(f"\nfedhosp bench, {m['date']}, commit {m['commit']}: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
          f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; load average {min(loads):.1f}-{max(loads):.1f} during "
          f"the run{' (shared machine: timings are noisy)' if max(loads) > (m['cores'] or 1) else ''}; "
          f"{results['seconds'] / 60:.0f} min{' (--quick)' if args.quick else ''}\n")
    print(table.render(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {args.out}")
    if args.page is not None:
        print(f"page: {performance_doc.write(results, args.page)}")
    return 1 if any("error" in r for r in results["sections"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
