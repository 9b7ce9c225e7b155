"""docs/performance.md, written by `make bench` from the results it just measured: no figure by hand.

The page says what each benchmark measures and how to read a miss; every number on it comes
from bench/results.json of the run that wrote it (machine, commit, load and the one table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import quality, table

PAGE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"

INTRO = """\
# Performance (`make bench`)

*Written by `make bench` (bench/performance_doc.py) from `bench/results.json`; do not edit by hand.*

`make bench` (`QUICK=1`: a shorter, noisier pass) runs every benchmark in `bench/`, each in a fresh
process, and measures each figure as a ratio within one run on one machine, so that a figure
compares like with like whatever the machine. A figure measured while the load average was above
the machine's cores is noise, and the line below says so.
"""

READING = """\
## What each figure is

- **DP overhead**: one DP-SGD step (Opacus: per-sample gradients, clipping, noise) over one plain
  step, per grad-sample mode; the default mode is the fastest whose clipped gradients equal hooks'.
- **Framework**: a Flower round (Ray simulation, the in-process engine) over the same training
  without Flower; and a deployment round (TLS, node authentication, SuperLink and SuperNodes on
  loopback) over a simulation round, split into the phases each site's log times.
- **Scaling**: peak memory of the whole process tree (PSS, and RSS) for many Ray sites.
- **Decoding**: images from the site's decode cache over decoding them again, in a new process.
- **Communication**: bytes on the packed wire for float16 updates over float32, and what it costs
  the final metric on the same seeds.
- **Hardware**: how close a step comes to the machine's matmul ceiling; bf16 autocast's speed-up.
- **Membership inference**: a loss-threshold attack's AUC on the trained model, without and with DP.
- **Quality**: BreastMNIST over 5 Dirichlet(0.5) sites under DP-SGD (ε = 8, δ = 1e-5), per recipe (small CNN,
  scattering features, pretrained on a public pool): balanced accuracy and AUC of the federated model on
  the official test split, mean ± spread over seeds; the full table (pooled, local-only, sensitivity,
  specificity) follows the figures below.

Why a miss stands, and what moved a figure, is in the commit that moved it (`git log -- bench/`).
"""


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    loads = [v[0] for v in results.get("load", {}).values()] or [0.0]
    busy = max(loads) > (m.get("cores") or 1)
    packages = ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())
    run = (f"Measured {m['date']} at commit {m['commit']}{' with --quick' if results.get('quick') else ''}: "
           f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {'GPU ' + m['gpu'] if m['gpu'] else 'no GPU'}; "
           f"{packages}; load average {min(loads):.1f}-{max(loads):.1f}"
           f"{' (busy machine: timings are noisy)' if busy else ''}; {results['seconds'] / 60:.0f} min.")
    sections = ", ".join(results.get("sections", {}))
    rows = [table.HEADER, *(tuple(r) for r in results["table"])]
    lines = ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(table.HEADER))
    page = [INTRO, run, "", f"Sections in this run: {sections}.", "", *lines, "", READING]
    found = results.get("sections", {}).get("quality", {})
    if found.get("summary"):
        page += ["## Quality under DP: BreastMNIST, every recipe (bench/quality.py)", "", quality.markdown(found), ""]
    return "\n".join(page)


def write(results: dict[str, Any], page: Path = PAGE) -> Path:
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(results))
    return page
