"""Decode throughput, cold vs cached, on the real head CT series (slices per second).

Cold: an empty cache folder, every slice read, rescaled, windowed and resized. Cached,
same process: what the next round in a live Flower worker pays. Cached, new process:
the file digests are forgotten and must come back from the site's cache folder (a
deployment starts a fresh process per round). Prints the ratios (goal: cached >= 10x
cold) and writes them as JSON. Skips cleanly when ../shared/data is absent.
Usage: python bench/decode.py [--data DIR] [--size 32] [--repeats 5] [--out runs/bench/decode.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

from common.data import cache, digests
from common.data.decode import decode_example
from common.data.example import Example, image_files

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "ct_head_ge"


def timed(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(data: Path, size: int, repeats: int) -> dict:
    examples = [Example(path, label=0) for path in image_files(data)]
    decode = partial(decode_example, size=size)
    decode(examples[0])  # imports and first-call set-up are not decoding
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def cold() -> None:
            digests.forget()
            cache.load_or_decode(examples, data, Path(tmp) / f"cold-{next(counter)}", {"size": size}, decode)

        def cached() -> None:
            cache.load_or_decode(examples, data, Path(tmp) / "warm", {"size": size}, decode)

        def new_process() -> None:
            digests.forget()
            cached()

        cold_s = timed(cold, repeats)
        cached()  # fills the warm cache
        cached_s, new_process_s = timed(cached, repeats), timed(new_process, repeats)
    n = len(cache.load_or_decode(examples, data, Path(tempfile.mkdtemp()), {"size": size}, decode).names)
    return {
        "data": str(data), "slices": n, "image_size": size, "repeats": repeats,
        "cold_slices_per_s": n / cold_s,
        "cached_slices_per_s": n / cached_s,
        "cached_new_process_slices_per_s": n / new_process_s,
        "cached_over_cold": cold_s / cached_s,
        "cached_new_process_over_cold": cold_s / new_process_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=32, help="model input size (default 32, the run default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/decode.json"))
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"skipped: {args.data} is absent (the real-data folder is not beside this checkout)")
        return 0
    r = measure(args.data, args.size, args.repeats)
    print(f"decode throughput on {r['slices']} slices of {r['data']} at {r['image_size']}px "
          f"(median of {r['repeats']}):")
    print(f"  cold                   {r['cold_slices_per_s']:10.0f} slices/s")
    print(f"  cached, same process   {r['cached_slices_per_s']:10.0f} slices/s   "
          f"{r['cached_over_cold']:6.1f}x cold")
    print(f"  cached, new process    {r['cached_new_process_slices_per_s']:10.0f} slices/s   "
          f"{r['cached_new_process_over_cold']:6.1f}x cold")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2))
    print(f"results: {args.out}")
    return 0 if r["cached_new_process_over_cold"] >= 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
