"""DP overhead: one Opacus DP-SGD step / one plain SGD step, per registry model, per grad-sample mode.

Each registry model at the run's default input size and batch (RunConfig), for every
mode Opacus 1.6 offers on one device: `hooks` (per-layer grad samplers), `ew`
(torch's ExpandedWeights), `functorch` (vmap over every layer) and `ghost` (ghost
clipping: per-sample norms without per-sample gradients, then a second backward).
A mode is *correct* when, with no noise and a clipping bound that binds on every
sample, its step applies the same gradient as `hooks` (relative error below TOL).
The fastest correct mode is what `common.models` should name for the model; the
table says whether it does. Plain and DP steps of one model are timed back to back, one
step of each in turn, and the ratio is the median over repeats of (DP step / plain step).

Usage: python -m bench.dp_overhead [--repeats 9] [--steps 0] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import training
from common.config import RunConfig
from common.models import REGISTRY, build_model, grad_sample_mode

MODES = ("hooks", "ew", "functorch", "ghost")
TOL = 1e-3  # relative L2 error of the applied gradient against hooks
CLIP = 1e-3  # binds on every sample of a freshly initialised model
MARGIN = 0.05  # a mode must be this much faster than hooks to become a model's default
TIMING_S = 0.3  # auto steps per timing: enough to time a fast step above the timer's noise


class PerSampleLoss:
    """The task's training loss with a `reduction` Opacus can switch: ghost clipping needs the
    per-sample losses ("none"); their mean is exactly `training.LOSSES[task]`."""

    def __init__(self, task: str) -> None:
        self.task, self.reduction = task, "mean"

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            return training.LOSSES[self.task](logits, target)
        per_sample = [training.LOSSES[self.task](logits[i : i + 1], target[i : i + 1]) for i in range(len(target))]
        return torch.stack(per_sample)


def batch(task: str, size: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g)
    if task == "segmentation":
        y = (torch.rand(n, size, size, generator=g) > 0.9).long()
    else:
        y = torch.randint(0, 2, (n,), generator=g)
    return x.to(device), y.to(device)


def make_step(model: nn.Module, mode: str | None, task: str, x: torch.Tensor, y: torch.Tensor,
              clip: float = CLIP) -> tuple[Callable[[], None], nn.Module]:
    """A closure doing one training step (plain when mode is None); returns it and the trained module."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn: Callable[..., Any] = training.LOSSES[task]
    module = model
    if mode is not None:
        loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=len(y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
                max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode, criterion=PerSampleLoss(task))
        if mode == "ghost":
            module, optimizer, loss_fn, _ = made
        else:
            module, optimizer, _ = made

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(module(x), y).backward()
        optimizer.step()

    return step, module


def applied_gradient(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten() for p in model.parameters() if p.grad is not None])


def check(base: nn.Module, mode: str, task: str, x: torch.Tensor, y: torch.Tensor,
          reference: torch.Tensor | None) -> tuple[torch.Tensor | None, float | None, str]:
    """(gradient, relative error vs hooks, '' or why the mode fails)."""
    model = copy.deepcopy(base)
    try:
        step, _ = make_step(model, mode, task, x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()
        grad = applied_gradient(model)
    except Exception as exc:  # a mode Opacus or torch cannot run on this model
        return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if reference is None:
        return grad, 0.0, ""
    if grad.shape != reference.shape:
        return grad, None, "gradient shapes differ from hooks"
    error = float((grad - reference).norm() / reference.norm())
    return grad, error, "" if error < TOL else f"applied gradient differs from hooks by {error:.2g}"


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step, over `steps` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def measure_model(name: str, repeats: int, steps: int, device: torch.device) -> dict[str, Any]:
    run = RunConfig()
    task = REGISTRY[name].task
    size, n = run.image_size, run.batch_size
    torch.manual_seed(0)
    base = build_model(task, name, 1, run.num_classes, size).to(device)
    x, y = batch(task, size, n, device)
    modes: dict[str, dict[str, Any]] = {}
    reference = None
    steppers: dict[str, Callable[[], None]] = {}
    for mode in MODES:
        reference_grad, error, failure = check(base, mode, task, x, y, reference)
        if mode == "hooks":
            reference = reference_grad
        modes[mode] = {"correct": not failure, "error_vs_hooks": error, **({"failure": failure} if failure else {})}
        if not failure:
            steppers[mode] = make_step(copy.deepcopy(base), mode, task, x, y, clip=1.0)[0]
    steppers = {"plain": make_step(copy.deepcopy(base), None, task, x, y)[0], **steppers}
    times: dict[str, list[float]] = {k: [] for k in steppers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in steppers.values():  # warm-up: first calls allocate and pick kernels
            timed(step, 1, device)
        steps = steps or max(1, min(10, math.ceil(TIMING_S / timed(steppers["plain"], 1, device))))
        for _ in range(repeats):  # step by step in turn, so a change of load hits every mode alike
            spent = dict.fromkeys(steppers, 0.0)
            for _ in range(steps):
                for key, step in steppers.items():
                    spent[key] += timed(step, 1, device)
            for key, total in spent.items():
                times[key].append(total / steps)
    plain = times.pop("plain")
    for mode, ts in times.items():
        ratios = [t / p for t, p in zip(ts, plain, strict=True)]
        modes[mode].update({"step_ms": 1000 * statistics.median(ts), "dp_over_plain": statistics.median(ratios)})
    return {"model": name, "task": task, "image_size": size, "batch_size": n, "device": str(device),
            "steps_per_timing": steps, "plain_step_ms": 1000 * statistics.median(plain), "modes": modes,
            "fastest_correct": fastest_correct(modes), "default": grad_sample_mode(base)}


def fastest_correct(modes: dict[str, dict[str, Any]]) -> str:
    """The correct mode with the lowest DP/plain ratio, if it beats hooks by more than MARGIN;
    otherwise hooks (Opacus's default, the reference): a tie within noise is no reason to switch."""
    timed_modes = {m: r["dp_over_plain"] for m, r in modes.items() if "dp_over_plain" in r}
    best = min(timed_modes, key=timed_modes.__getitem__)
    if "hooks" in timed_modes and timed_modes[best] > timed_modes["hooks"] * (1 - MARGIN):
        return "hooks"
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=0, help="steps per timing (0: auto, ~0.3 s of plain steps)")
    parser.add_argument("--threads", type=int, default=RunConfig().client_threads,
                        help="torch threads (default: client-threads, what a virtual site trains with)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = training.pick_device(args.device)
    result = {"threads": args.threads, "repeats": args.repeats, "steps": args.steps,
              "models": [measure_model(name, args.repeats, args.steps, device) for name in REGISTRY]}
    for m in result["models"]:
        print(f"{m['model']} {m['image_size']}px batch {m['batch_size']} on {m['device']}: plain "
              f"{m['plain_step_ms']:.1f} ms/step; default {m['default']}, fastest correct {m['fastest_correct']}")
        for mode, r in m["modes"].items():
            what = f"{r['dp_over_plain']:.2f}x plain ({r['step_ms']:.1f} ms)" if "dp_over_plain" in r else r["failure"]
            print(f"  {mode:<10} {what}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
