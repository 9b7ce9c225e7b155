"""`make gpu-check`: does training on the GPU give what training on CPU gives, and what does DP cost there?

For each registry model (common/models): one plain SGD step and one Opacus DP-SGD step (the model's
own grad-sample mode, no noise, a clipping bound that binds on every sample, as bench/dp_overhead.py
builds them) from the same weights and batch, on the device and on CPU: the applied gradients (the
clipped per-sample gradients, summed) must agree to TOL. Then each step timed on the device, and the
DP / plain ratio. Last, a 3-site `fedhosp simulate` on Ray with `--gpus-per-site`: it must finish,
and every site must have been given a GPU by Ray (ray-nodes.json). One table; exit status 1 on any
mismatch or failure, 2 without a GPU.

`--cpu` runs the same with CPU as "the device" (compared against itself, a simulation with no GPU
share), so the script itself stays tested on machines without GPU (tests/bench_gpu_check/). TF32 is
off for the comparison: it rounds float32 matmuls and convolutions to 10-bit mantissas on purpose.
The deployment round on GPU (`fedhosp server` / `client`) is not part of this check.

Usage: python -m bench.gpu_check [--cpu] [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.dp_overhead import applied_gradient, batch, make_step, timed
from common.config import RunConfig
from common.models import REGISTRY, build_model, grad_sample_mode

TOL = 1e-3  # relative L2 error of the applied gradient, device against CPU
GPUS_PER_SITE = 0.25
SITES = 3


@dataclass
class Row:
    what: str
    check: str  # what was compared, or run
    error: float | None = None  # relative error against CPU
    plain_ms: float | None = None
    dp_ms: float | None = None
    seconds: float | None = None
    failure: str = ""

    @property
    def ratio(self) -> float | None:
        return self.dp_ms / self.plain_ms if self.dp_ms and self.plain_ms else None


# --quick (what the suite runs on CPU): the two models trained from scratch; the full check (make gpu-check,
# on a GPU) takes every registry model, the torchvision and scattering ones minutes each on a CPU
QUICK_MODELS = ("cnn", "unet")


def exact_float32() -> None:
    """Full float32 on the GPU, as on CPU: TF32 would make the comparison a test of rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def gradient_on(base: nn.Module, mode: str | None, task: str, x: torch.Tensor, y: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """The gradient one step applies (after clipping, for DP), computed on `device`, returned on CPU."""
    model = copy.deepcopy(base).to(device)
    step, _ = make_step(model, mode, task, x.to(device), y.to(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()
    return applied_gradient(model).cpu()


def step_ms(base: nn.Module, mode: str | None, task: str, x: torch.Tensor, y: torch.Tensor,
            device: torch.device, repeats: int) -> float:
    """Median milliseconds per step on `device`, after one warm-up step (allocation, kernel choice)."""
    model = copy.deepcopy(base).to(device)
    step, _ = make_step(model, mode, task, x.to(device), y.to(device), clip=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed(step, 1, device)
        return 1000 * statistics.median(timed(step, 3, device) for _ in range(repeats))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_model(name: str, device: torch.device, quick: bool) -> list[Row]:
    """Plain and DP rows for one registry model: gradient agreement with CPU, then speed on the device."""
    run = RunConfig()
    task = REGISTRY[name].task
    size, n = (32, 8) if quick else (run.image_size, run.batch_size)
    torch.manual_seed(0)
    base = build_model(task, name, 1, run.num_classes, size)
    mode = grad_sample_mode(base)
    x, y = batch(task, size, n, torch.device("cpu"))
    rows = []
    for label, dp_mode in (("plain", None), (f"dp ({mode})", mode)):
        row = Row(name, label)
        try:
            row.error = relative(gradient_on(base, dp_mode, task, x, y, device),
                                 gradient_on(base, dp_mode, task, x, y, torch.device("cpu")))
            if not row.error < TOL:  # NaN fails too
                row.failure = f"gradient differs from CPU by {row.error:.2g} (tolerance {TOL:g})"
        except Exception as exc:  # a model or mode that cannot run on this device: a failed row, not a crash
            row.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        rows.append(row)
    if not any(r.failure for r in rows):
        repeats = 3 if quick else 9
        rows[0].plain_ms = rows[1].plain_ms = step_ms(base, None, task, x, y, device, repeats)
        rows[1].dp_ms = step_ms(base, mode, task, x, y, device, repeats)
    return rows


def check_simulation(gpus_per_site: float, quick: bool, out: Path) -> Row:
    """`fedhosp simulate` on Ray, each site reserving `gpus_per_site`: every site must get a GPU when it
    asked for one (none when not), and the run must finish."""
    rounds, images = (1, 20) if quick else (2, 100)
    command = [sys.executable, "-m", "fedhosp", "simulate", "--sites", str(SITES), "--rounds", str(rounds),
               "--images-per-site", str(images), "--gpus-per-site", f"{gpus_per_site:g}", "--out", str(out),
               "--run-config", "image-size=32 local-epochs=1"]
    row = Row(f"simulate {SITES} sites", f"--gpus-per-site {gpus_per_site:g}")
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ""})
    row.seconds = time.monotonic() - started
    if proc.returncode != 0:
        row.failure = f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:160]}"
        return row
    placed = json.loads((out / "ray-nodes.json").read_text())
    with_gpu = sum(bool(p["gpus"]) for p in placed.values())
    expected = len(placed) if gpus_per_site > 0 else 0
    if len(placed) != SITES or with_gpu != expected:
        row.failure = f"{with_gpu} of {len(placed)} sites were given a GPU, expected {expected}"
    return row


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(rows: list[Row], device: torch.device) -> str:
    head = (f"{'what':<20} {'check':<26} {'err vs cpu':>10} {'plain ms':>9} {'dp ms':>9} {'dp/plain':>8} "
            f"{'s':>6}  status")
    lines = [f"gpu check on {device} (against cpu; tolerance {TOL:g})", head]
    for r in rows:
        lines.append(f"{r.what:<20} {r.check:<26} {_num(r.error, '.2e'):>10} {_num(r.plain_ms, '.2f'):>9} "
                     f"{_num(r.dp_ms, '.2f'):>9} {_num(r.ratio, '.2f'):>8} {_num(r.seconds, '.0f'):>6}  "
                     f"{r.failure or 'ok'}")
    failed = sum(bool(r.failure) for r in rows)
    lines.append(f"{'FAILED' if failed else 'PASSED'}: {failed} of {len(rows)} checks failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU as the device (no GPU needed): tests this script")
    parser.add_argument("--quick", action="store_true",
                        help="small batches, the from-scratch models only (QUICK_MODELS), one simulated round")
    parser.add_argument("--keep", type=Path, default=None, help="keep the simulation's output here")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device here; `--cpu` runs the same checks on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    exact_float32()
    names = QUICK_MODELS if args.quick else tuple(REGISTRY)
    rows = [row for name in names for row in check_model(name, device, args.quick)]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = args.keep or Path(tmp) / "simulate"
        rows.append(check_simulation(0.0 if args.cpu else GPUS_PER_SITE, args.quick, out))
    print(render(rows, device))
    return 1 if any(r.failure for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
