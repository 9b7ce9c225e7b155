"""The one table `make bench` prints: every figure as a ratio or rate, beside its target (issue #10)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Row = tuple[str, str, str, str, str]  # section, figure, value, target, verdict
HEADER: Row = ("section", "figure", "value", "target", "")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def dp_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for m in r["models"]:
        where = f"{m['model']} {m['image_size']}px batch {m['batch_size']} ({m['device']}, {r['threads']} threads)"
        modes = m["modes"]
        shown = " ".join(f"{k} {v['dp_over_plain']:.2f}x" if "dp_over_plain" in v else f"{k} fails"
                         for k, v in modes.items())
        rows.append(("DP overhead", f"DP step / plain step, {where}", shown, "", ""))
        default = modes.get(m["default"], {}).get("dp_over_plain")
        rows.append(("", f"  default mode {m['default']} (fastest correct: {m['fastest_correct']})",
                     f"{default:.2f}x" if default else "-", "<= 1.5x",
                     verdict(default is not None and default <= 1.5) if m["model"] in ("cnn", "unet") else ""))
    return rows


def framework_rows(r: dict[str, Any]) -> list[Row]:
    ray, inproc = r["over_sequential"]["ray"], r["over_sequential"]["inprocess"]
    what = f"{r['sites']} sites, {r['rounds']} rounds, {r['images_per_site']} images/site"
    return [
        ("Framework", f"Ray simulation / sequential, steady round ({what})", f"{ray['steady_state']:.2f}x",
         "<= 1.0x", verdict(ray["steady_state"] <= 1.0)),
        ("", "Ray simulation / sequential, whole run with start-up", f"{ray['with_startup']:.2f}x", "<= 1.3x",
         verdict(ray["with_startup"] <= 1.3)),
        ("", "in-process Flower (no Ray) / sequential: steady, whole run",
         f"{inproc['steady_state']:.2f}x, {inproc['with_startup']:.2f}x", "", ""),
    ]


PHASES = ("wait", "receive", "clientapp", "send")  # bench/deployment.py phases()


def _mean_phase(sites: list[dict[str, dict[str, float]]], kind: str, phase: str) -> float:
    values = [site[kind][phase] for site in sites if phase in site.get(kind, {})]
    return sum(values) / len(values) if values else float("nan")


def deployment_rows(r: dict[str, Any]) -> list[Row]:
    imp = r["clientapp_import"]
    return [
        ("Framework", f"deployment round / simulation round, steady ({r['sites']} sites, TLS + node auth, loopback)",
         f"{r['steady_round_over_simulation']:.2f}x", "<= 1.5x", verdict(r["steady_round_over_simulation"] <= 1.5)),
        ("", "  round 1 (the simulation's includes its workers' start)", f"{r['first_round_over_simulation']:.2f}x",
         "", ""),
        ("", "  deployment vs simulation rounds (s)",
         f"{'/'.join(f'{x:.0f}' for x in r['deployment']['round_s'])} vs "
         f"{'/'.join(f'{x:.1f}' for x in r['simulation']['round_s'])}", "", ""),
        *[("", f"  a site's {kind} message, median s: wait for it / receive / clientapp / send reply",
           " / ".join(f"{_mean_phase(r['deployment']['phases'], kind, p):.1f}" for p in PHASES), "", "")
          for kind in ("train", "evaluate")],
        ("", "  hospitals as Flower ships them (--stock-clientapp --stock-waits): steady, rounds (s)",
         f"{r['stock_steady_round_over_simulation']:.1f}x, "
         f"{'/'.join(f'{x:.0f}' for x in r['deployment_stock']['round_s'])}", "", ""),
        ("", "  what each stock message pays first: a fresh interpreter importing torch + our app",
         f"{imp['wall_s']:.1f}s ({imp['cpu_s']:.1f} CPU s)", "", ""),
    ]


def scaling_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for i, run in enumerate(r["runs"]):
        target = "<= 4 GiB" if run["sites"] == 100 else ""
        ok = verdict(run["peak_pss_gib"] <= 4) if target else ""
        rows.append(("Scaling" if i == 0 else "", f"{run['sites']} sites ({r['rounds']} rounds, Ray): wall, "
                     "steady round, peak memory PSS (RSS)",
                     f"{run['total_s']:.0f}s, {run['steady_round_s']:.1f}s, {run['peak_pss_gib']:.2f} "
                     f"({run['peak_rss_gib']:.2f}) GiB", target, ok))
    return rows


def decoding_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for i, (name, d) in enumerate(r.items()):
        section = "Data" if i == 0 else ""
        if "skipped" in d:
            rows.append((section, f"decode, {name}", f"skipped: {d['skipped']}", "", ""))
            continue
        rows.append((section, f"decode {name} ({d['slices']} slices, {d['image_size']}px): cold, cached (slices/s)",
                     f"{d['cold_slices_per_s']:.0f}, {d['cached_slices_per_s']:.0f}", "", ""))
        rows.append(("", "  cached / cold: same process, new process",
                     f"{d['cached_over_cold']:.0f}x, {d['cached_new_process_over_cold']:.0f}x", ">= 10x",
                     verdict(d["cached_new_process_over_cold"] >= 10)))
    return rows


def communication_rows(r: dict[str, Any]) -> list[Row]:
    b32, b16 = r["bytes"]["float32"], r["bytes"]["float16"]
    change = r["float16_change_points"]
    mean = {k: sum(v) / len(v) for k, v in change.items()}
    return [
        ("Communication", "bytes per site per round, float32: down, up (update)",
         f"{b32['down'] / 1024:.1f}, {b32['up'] / 1024:.1f} ({b32['update'] / 1024:.1f}) KiB", "", ""),
        ("", "float16 updates: up (update) bytes",
         f"{b16['up'] / 1024:.1f} ({b16['update'] / 1024:.1f}) KiB", "", ""),
        ("", "  float16 / float32: update, all traffic", f"{r['update_ratio']:.2f}x, {r['total_ratio']:.2f}x",
         "0.5x", verdict(r["update_ratio"] <= 0.5)),
        ("", f"  final metric, float16 - float32 ({r['sites']} sites, {r['rounds']} rounds, DP; points, mean "
         f"(per seed {','.join(map(str, r['seeds']))}))",
         ", ".join(f"{k} {mean[k]:+.2f} ({'/'.join(f'{x:+.1f}' for x in v)})" for k, v in change.items()),
         ">= -0.5", verdict(min(mean.values(), default=0.0) >= -0.5)),
    ]


def hardware_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = [("Hardware", f"fp32 matmul ceiling ({r['threads']} threads)",
                        f"{r['matmul_gflops']:.0f} GFLOP/s", "", "")]
    for m in r["models"]:
        rows.append(("", f"{m['model']} plain step: achieved / ceiling; bf16 autocast speed-up (speed only)",
                     f"{100 * m['of_matmul_ceiling']:.0f}% ({m['achieved_gflops']:.1f} GFLOP/s); "
                     f"{m['bf16_speedup']:.2f}x", "", ""))
    return rows


def membership_rows(r: dict[str, Any]) -> list[Row]:
    shown = ", ".join(f"{name} {v['attack_auc']:.3f}" for name, v in r.items())
    return [("Privacy", "membership-inference attack AUC (0.5: nothing revealed)", shown, "", "")]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "dp_overhead": dp_rows, "hardware": hardware_rows, "decoding": decoding_rows,
    "communication": communication_rows, "membership": membership_rows, "framework": framework_rows,
    "deployment": deployment_rows, "scaling": scaling_rows,
}


def rows(sections: dict[str, dict[str, Any]]) -> list[Row]:
    out: list[Row] = []
    for name, result in sections.items():
        if "error" in result:
            out.append((name, "did not finish", f"{result['error']}: {' | '.join(result.get('log_tail', []))}"[:150],
                        "", ""))
            continue
        try:
            out.extend(ROWS[name]({k: v for k, v in result.items() if k != "seconds"}))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            out.append((name, "unreadable result", f"{type(exc).__name__}: {exc}", "", ""))
    return out


def render(table: list[Row]) -> str:
    lines = [HEADER, *table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
