"""Hardware efficiency: achieved FLOP/s of a plain training step / this machine's matmul FLOP/s.

The ceiling is a large float32 matmul on the same threads; a step's FLOPs are counted by
torch's FlopCounterMode (forward and backward, convolutions and matmuls). Also the speed-up
of the same plain step under bf16 autocast: speed only (whether the metric holds under
bf16 is not checked here, so no run uses it). Medians over interleaved repeats.

Usage: python -m bench.hardware [--repeats 5] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.dp_overhead import batch
from common import training
from common.config import RunConfig
from common.models import REGISTRY, build_model

MATMUL_N = 2048


def seconds(run: Callable[[], object], times: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(times):
        run()
    return (time.perf_counter() - started) / times


def matmul_flops(repeats: int) -> float:
    a, b = torch.rand(MATMUL_N, MATMUL_N), torch.rand(MATMUL_N, MATMUL_N)
    seconds(lambda: a @ b)
    return statistics.median(2 * MATMUL_N**3 / seconds(lambda: a @ b, 3) for _ in range(repeats))


def plain_step(name: str, bf16: bool) -> Callable[[], None]:
    run = RunConfig()
    task = REGISTRY[name].task
    torch.manual_seed(0)
    model = build_model(task, name, 1, run.num_classes, run.image_size)
    x, y = batch(task, run.image_size, run.batch_size, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = training.LOSSES[task]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with cast:
            loss = loss_fn(model(x), y)
        loss.float().backward()
        optimizer.step()

    return step


def measure_model(name: str, repeats: int, ceiling: float) -> dict[str, Any]:
    fp32, bf16 = plain_step(name, False), plain_step(name, True)
    counter = FlopCounterMode(display=False)
    with counter:
        fp32()
    flops = counter.get_total_flops()
    bf16(), fp32()  # warm-up
    t32, t16 = [], []
    for _ in range(repeats):
        t32.append(seconds(fp32, 3))
        t16.append(seconds(bf16, 3))
    achieved = flops / statistics.median(t32)
    return {"model": name, "step_gflop": flops / 1e9, "achieved_gflops": achieved / 1e9,
            "of_matmul_ceiling": achieved / ceiling, "bf16_speedup": statistics.median(
                a / b for a, b in zip(t32, t16, strict=True))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=RunConfig().client_threads,
                        help="torch threads (default: client-threads, what a virtual site trains with)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ceiling = matmul_flops(args.repeats)
    result = {"threads": args.threads, "matmul_gflops": ceiling / 1e9,
              "models": [measure_model(name, args.repeats, ceiling) for name in REGISTRY]}
    print(f"matmul ceiling {result['matmul_gflops']:.0f} GFLOP/s on {args.threads} threads")
    for m in result["models"]:
        print(f"  {m['model']}: {m['step_gflop']:.2f} GFLOP/step, {m['achieved_gflops']:.1f} GFLOP/s = "
              f"{100 * m['of_matmul_ceiling']:.0f}% of the ceiling; bf16 autocast {m['bf16_speedup']:.2f}x faster")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
