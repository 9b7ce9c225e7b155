"""Data: decode throughput, cold vs cached, on synthetic DICOM and on the real head CT when present.

bench/decode.py does the measuring (cold: empty cache; cached in the same process; cached
in a new process, digests forgotten); this runs it on a synthetic hospital's DICOM files
(the images only, not their masks) and on ../shared/data/dicom/ct_head_ge.

Usage: python -m bench.decoding [--images 500] [--size 32] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench import decode
from common.data import synthetic


def synthetic_site(root: Path, images: int) -> Path:
    """One synthetic hospital's DICOM slices, alone in their folder."""
    site = synthetic.write_hospitals(root, 1, seed=0, images_per_site=images)[0]
    folder = root / "dicom"
    folder.mkdir()
    for path in site.glob("*.dcm"):
        shutil.move(path, folder / path.name)
    return folder


def measure(images: int, size: int, repeats: int, real: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        result["synthetic"] = decode.measure(synthetic_site(Path(tmp), images), size, repeats)
    result["real_ct"] = decode.measure(real, size, repeats) if real.is_dir() else {"skipped": f"{real} is absent"}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="synthetic images")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real", type=Path, default=decode.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args.images, args.size, args.repeats, args.real)
    for name, r in result.items():
        if "skipped" in r:
            print(f"{name}: skipped ({r['skipped']})")
            continue
        print(f"{name} ({r['slices']} slices at {r['image_size']}px): cold {r['cold_slices_per_s']:.0f}/s, cached "
              f"{r['cached_slices_per_s']:.0f}/s ({r['cached_over_cold']:.1f}x), cached in a new process "
              f"{r['cached_new_process_slices_per_s']:.0f}/s ({r['cached_new_process_over_cold']:.1f}x)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
