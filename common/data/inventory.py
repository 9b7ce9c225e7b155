"""`fedhosp inspect`: what a site's data folder holds, told to the hospital before round 1.

It decodes every image exactly as training will, so the files it calls unreadable are
the files a round would skip, with the same reason. It counts files by modality,
manufacturer, size, photometric and transfer syntax, the label balance of the
examples training would use, and which identifying tags are present: only their
names and counts, never a value. The last line says go or no-go, and why.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from common.data import dicom, folders, identifying, pixels, sources
from common.data.decode import decode_example, load_frames
from common.data.example import MANIFESTS, RASTER_SUFFIXES, Example
from common.errors import DataError, FedhospError, MaskMismatch

FACETS = ("modality", "manufacturer", "size", "photometric", "transfer syntax")
CHECK_SIZE = 32  # masks are compared with their images before resizing, so any size does
MINORITY = 0.1  # a class under this share of a site's examples is worth a warning


@dataclass
class Inventory:
    root: str
    task: str
    source: str = ""  # which layout sources.load found; "" when none fits
    source_problem: str = ""  # why no examples could be listed
    files: int = 0  # image files found (an .npz counts as one)
    readable_files: int = 0
    images: int = 0  # images that decode: frames of multi-frame files and .npz rows count one each
    examples: int = 0  # of those, the ones training would use
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: {f: {} for f in FACETS})
    labels: dict[str, int] = field(default_factory=dict)  # class index -> examples
    classes: dict[str, int] = field(default_factory=dict)  # class folder name -> class index
    splits: dict[str, int] = field(default_factory=dict)  # split fixed by the source -> examples
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    identifying: dict[str, int] = field(default_factory=dict)  # tag keyword -> files holding a value
    unlisted: int = 0  # image files no example uses
    mask_mismatches: list[str] = field(default_factory=list)  # images whose mask does not fit: stops the site
    warnings: list[str] = field(default_factory=list)
    go: bool = False
    summary: str = ""


def inspect(root: Path, task: str = "classification") -> Inventory:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: point inspect at a site's data folder")
    inv = Inventory(str(root), task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every oddity; the report says what matters
        examples = _examples(root, task, inv)
        masks = _mask_files(root)
        files = [p for p in sources.image_files(root) if p not in masks]
        inv.files = len(files) + len({e.path for e in examples if e.member})
        for path in files:
            _count_header(path, root, inv)
        used = _decode_examples(examples, root, inv)
        for path in files:
            if path not in used:
                inv.unlisted += 1 if inv.source else 0
                _decode_file(path, root, inv)
    inv.readable_files = inv.files - len(inv.unreadable)
    _verdict(inv)
    return inv


def _examples(root: Path, task: str, inv: Inventory) -> list[Example]:
    try:
        examples = sources.load(root, task)
    except DataError as exc:
        inv.source_problem = str(exc)
        return []
    manifest = root / MANIFESTS[task][0]
    if manifest.is_file():
        inv.source = f"manifest {manifest.name}"
    elif any(e.member for e in examples):
        inv.source = f"archive {examples[0].path.name}"
    else:
        inv.source = "class sub-folders"
        inv.classes = folders.class_folders(root)
    return examples


def _mask_files(root: Path) -> set[Path]:
    """Masks a masks.csv names are labels, not images to count (a folder may serve both tasks)."""
    try:
        return {e.mask for e in sources.dicom_folder(root, "segmentation") if e.mask is not None}
    except DataError:
        return set()


def _count_header(path: Path, root: Path, inv: Inventory) -> None:
    if path.suffix.lower() in RASTER_SUFFIXES:
        _count_raster(path, inv)
        return
    try:
        ds = dicom.read(path, header_only=True)
    except DataError:
        return  # decoding reports it, with the reason
    try:
        frames = pixels.number_of_frames(ds)
    except (DataError, ValueError, TypeError):
        frames = 1
    size = f"{ds.get('Columns', '?')}x{ds.get('Rows', '?')}" + (f" x{frames} frames" if frames > 1 else "")
    try:
        syntax = pixels.transfer_syntax(ds)
        syntax_name = syntax.name if syntax.name != str(syntax) else f"{syntax} (unknown to pydicom)"
    except DataError:
        syntax_name = "(none)"
    for facet, value in (("modality", ds.get("Modality")), ("manufacturer", ds.get("Manufacturer")),
                         ("size", size), ("photometric", ds.get("PhotometricInterpretation")),
                         ("transfer syntax", syntax_name)):
        _bump(inv.counts[facet], str(value).strip() if value not in (None, "") else "(none)")
    for keyword in identifying.present(ds):
        _bump(inv.identifying, keyword)


def _count_raster(path: Path, inv: Inventory) -> None:
    try:
        with Image.open(path) as img:
            facts = ("(none)", "(none)", f"{img.width}x{img.height}", img.mode, img.format or "?")
    except Exception:
        return  # decoding reports it, with the reason
    for facet, value in zip(FACETS, facts, strict=True):
        _bump(inv.counts[facet], value)


def _decode_examples(examples: list[Example], root: Path, inv: Inventory) -> set[Path]:
    """Decode what training would; returns the files the examples cover."""
    failed: set[Path] = set()
    shapes: dict[Path, tuple[int, ...]] = {}
    for e in examples:
        try:
            rows, shape = _rows(e)
        except FedhospError as exc:
            if isinstance(exc, MaskMismatch):
                inv.mask_mismatches.append(str(e.path.relative_to(root)))
            if e.path not in failed:
                inv.unreadable.append({"file": str(e.path.relative_to(root)), "reason": _reason(exc)})
                failed.add(e.path)
            continue
        inv.images += rows
        inv.examples += rows
        if e.member:
            shapes.setdefault(e.path, shape)
        if inv.task == "classification":
            _bump(inv.labels, str(e.label), rows)
        if e.split:
            _bump(inv.splits, e.split, rows)
    for shape in shapes.values():
        for facet, value in zip(FACETS, ("(array)", "(none)", f"{shape[1]}x{shape[0]}", "grey", ".npz archive"),
                                strict=True):
            _bump(inv.counts[facet], value)
    return {e.path for e in examples}


def _rows(e: Example) -> tuple[int, tuple[int, ...]]:
    """How many images the example decodes into, and their (rows, columns) at the file's resolution."""
    if e.mask is None:
        stack = load_frames(e)
        return len(stack), stack.shape[1:]
    decode_example(e, CHECK_SIZE)  # the mask check, on the image at its own resolution
    return 1, ()


def _decode_file(path: Path, root: Path, inv: Inventory) -> None:
    try:
        inv.images += len(load_frames(Example(path)))
    except FedhospError as exc:
        inv.unreadable.append({"file": str(path.relative_to(root)), "reason": _reason(exc)})


def _reason(exc: BaseException) -> str:
    """The error without the file name it starts with (the report shows the name beside it)."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    return rest if sep and " " not in head else text


def _verdict(inv: Inventory) -> None:
    manifest = MANIFESTS[inv.task][0]
    if inv.unreadable:
        inv.warnings.append(f"{len(inv.unreadable)} file(s) cannot be decoded and will be skipped (listed above)")
    if inv.unlisted:
        inv.warnings.append(f"{inv.unlisted} image file(s) belong to no example and will not be used")
    if inv.identifying:
        inv.warnings.append(f"identifying tags present in {max(inv.identifying.values())} file(s): they stay on "
                            "this site and fedhosp never logs their values; de-identify before sharing files")
    if inv.labels:
        if len(inv.labels) == 1:
            inv.warnings.append("every example has the same label: this site can train but not tell classes apart")
        elif min(inv.labels.values()) < MINORITY * inv.examples:
            inv.warnings.append(f"class imbalance: the smallest class holds under {MINORITY:.0%} of the examples")
    if inv.source_problem:
        problem = inv.source_problem
    elif inv.mask_mismatches:
        problem = (f"{len(inv.mask_mismatches)} mask(s) do not fit their image ({inv.mask_mismatches[0]}): "
                   f"fix {manifest}")
    elif inv.examples == 0:
        problem = "no example decodes"
    else:
        problem = ""
    inv.go = not problem
    if inv.go:
        kinds = f", {len(inv.labels)} class(es)" if inv.labels else ""
        inv.summary = (f"GO: {inv.examples} training image(s) from {inv.source}{kinds}; "
                       f"{len(inv.warnings)} warning(s)")
    else:
        inv.summary = f"NO-GO: {problem}"


def _bump(counter: dict[str, int], key: str, by: int = 1) -> None:
    counter[key] = counter.get(key, 0) + by


def to_json(inv: Inventory) -> str:
    return json.dumps(asdict(inv), indent=2)


def render(inv: Inventory, top: int = 12) -> str:
    """The human report: one table per facet, then problems, then the verdict."""
    lines = [f"fedhosp inspect {inv.root}  (task: {inv.task})",
             f"source: {inv.source or 'none'}",
             f"files: {inv.files} image file(s), {inv.readable_files} decode into {inv.images} image(s); "
             f"{len(inv.unreadable)} unreadable; {inv.examples} training example(s)", ""]
    for facet in FACETS:
        lines += _table(facet, inv.counts[facet], "files", top)
    if inv.labels:
        names = {str(v): k for k, v in inv.classes.items()}
        shares = {f"{k} ({names[k]})" if k in names else k: v for k, v in sorted(inv.labels.items())}
        lines += _table("label", shares, "examples", top, total=inv.examples)
    if inv.splits:
        lines += _table("split (fixed by the source)", inv.splits, "examples", top)
    if inv.unreadable:
        lines.append(f"unreadable files ({len(inv.unreadable)})")
        lines += [f"  {u['file']}: {u['reason']}" for u in inv.unreadable]
        lines.append("")
    if inv.identifying:
        lines += _table("identifying tag present (values stay on site, never shown)", inv.identifying, "files", 99)
    lines += [f"warning: {w}" for w in inv.warnings]
    lines.append(inv.summary)
    return "\n".join(lines)


def _table(title: str, counts: dict[str, int], unit: str, top: int, total: int = 0) -> list[str]:
    if not counts:
        return []
    ranked = Counter(counts).most_common()
    shown, rest = ranked[:top], ranked[top:]
    width = max(len(title), *(len(k) + 2 for k, _ in shown))
    rows = [f"{title:<{width}}  {unit:>8}"]
    for key, n in shown:
        share = f"  {n / total:6.1%}" if total else ""
        rows.append(f"  {key:<{width - 2}}  {n:>8}{share}")
    if rest:
        rows.append(f"  {f'({len(rest)} more)':<{width - 2}}  {sum(n for _, n in rest):>8}")
    return [*rows, ""]
