"""`fedhosp predict`: the global model applied to a hospital's own images, on the hospital's own disk.

Images are decoded by the same function the sites trained with (`decode_example`,
then float16 as in the site's decode cache) at the size the model card names, so a
prediction here is the prediction the federation's evaluation made. Nothing is sent
anywhere: this module imports no Flower code, and everything it writes goes under
`--out`. Files that cannot be decoded are skipped and listed, as at a site.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from common import decision, explain, metrics, training
from common.data.decode import decode_example
from common.data.sources import Example
from common.errors import ConfigError, DataError, FedhospError, ModelFileError
from common.model_card import ModelCard, load_model

log = logging.getLogger(__name__)
PREDICTIONS, METRICS, SKIPPED = "predictions.csv", "metrics.json", "skipped.csv"
MASKS_DIR, EXPLAIN_DIR = "masks", "explain"
AT_DEFAULT = "at-0.5"  # metrics.json: two classes, the metrics at 0.5 beside those at the card's threshold
BATCH = 64
COLUMNS = {"classification": ("file", "label"), "segmentation": ("file", "mask")}
DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True)
class PredictOptions:
    model: Path
    data: Path
    out: Path
    labels: Path | None = None  # CSV file,label (or file,mask): predict exactly these files and score them
    explain: bool = False
    device: str = "auto"


@dataclass(frozen=True)
class PredictResult:
    card: ModelCard
    out: Path
    predicted: int
    skipped: tuple[tuple[str, str], ...]
    metrics: dict[str, Any] | None
    explained: int


@dataclass(frozen=True)
class Batch:
    names: list[str]
    images: torch.Tensor  # (N, 1, S, S) as the sites fed the model
    targets: list[Any]  # class index or (S, S) class map; None when unlabelled


def predict(opts: PredictOptions) -> PredictResult:
    """Predict every image, write predictions.csv (+ masks, heatmaps, metrics.json); return a summary."""
    card, model = load_model(opts.model)
    device = pick_device(opts.device)
    model.to(device)
    data = Path(opts.data)
    examples = labelled_examples(data, opts.labels, card.task) if opts.labels else scan(data)
    opts.out.mkdir(parents=True, exist_ok=True)
    task = Classify(card, opts) if card.task == "classification" else Segment(card, opts)
    skipped: list[tuple[str, str]] = []
    with open(opts.out / PREDICTIONS, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(task.header())
        for chunk in _chunks(examples, BATCH):
            batch = decode(chunk, data, card.image_size, skipped, card.in_channels)
            if batch.names:
                with torch.no_grad():
                    logits = model(batch.images.to(device)).float().cpu()
                writer.writerows(task.rows(batch, logits, model, device))
    _write_skipped(opts.out, skipped)
    if task.count == 0:
        raise DataError(f"none of the {len(examples)} files could be decoded: see {opts.out / SKIPPED}")
    scores = task.metrics() if opts.labels else None
    if scores is not None:
        report = {"model": str(opts.model), "labels": str(opts.labels), "task": card.task, "images": task.count,
                  "skipped": len(skipped), "metrics": scores, "card": card.to_dict()}
        (opts.out / METRICS).write_text(json.dumps(report, indent=2, allow_nan=False))
    return PredictResult(card, opts.out, task.count, tuple(skipped), scores, task.explained)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device auto or cpu")
    return training.pick_device(requested)


def scan(data: Path) -> list[Example]:
    """Every DICOM file under `data` (a .dcm name or the DICM preamble), in path order."""
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist: pass the folder holding the DICOM files")
    files = [p for p in sorted(data.rglob("*")) if p.is_file() and _is_dicom(p)]
    if not files:
        raise DataError(f"no DICOM files under {data} (*.dcm, or files with the DICM preamble); "
                        "PNG/JPEG images can be listed in a --labels CSV")
    return [Example(p) for p in files]


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    with open(path, "rb") as f:
        head = f.read(DICOM_MAGIC_OFFSET + 4)
    return head[DICOM_MAGIC_OFFSET:] == b"DICM"


def labelled_examples(data: Path, labels: Path, task: str) -> list[Example]:
    """The examples a ground-truth CSV lists (paths relative to `data`), checked like a site's manifest."""
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist: pass the folder holding the images")
    if not labels.is_file():
        raise DataError(f"labels file {labels} does not exist")
    column = COLUMNS[task][1]
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        header = set(reader.fieldnames or ())
        _check_header(labels, header, task)
        examples = [_labelled(data, labels, line, row, column) for line, row in enumerate(reader, start=2)]
    if not examples:
        raise DataError(f"{labels} lists no files: add one row per image (file,{column})")
    missing = [str(p) for e in examples for p in (e.path, e.mask) if p is not None and not p.is_file()]
    if missing:
        raise DataError(f"{labels} names {len(missing)} missing file(s): {', '.join(missing[:3])}")
    return examples


def _check_header(labels: Path, header: set[str], task: str) -> None:
    if set(COLUMNS[task]) <= header:
        return
    for other, columns in COLUMNS.items():
        if other != task and set(columns) <= header:
            raise ModelFileError(f"the model is for {task} but {labels} holds {other} ground truth "
                                 f"({','.join(columns)}): pass a {','.join(COLUMNS[task])} CSV or a {other} model")
    raise DataError(f"{labels}: the header must be '{','.join(COLUMNS[task])}', got {sorted(header)}")


def _labelled(data: Path, labels: Path, line: int, row: dict[str, str], column: str) -> Example:
    path = _inside(data, row["file"], labels, line)
    if column == "mask":
        return Example(path, mask=_inside(data, row["mask"], labels, line))
    try:
        label = int(row["label"])
    except (TypeError, ValueError):
        raise DataError(f"{labels} line {line}: label {row['label']!r} is not a class index (0, 1, ...)") from None
    if label < 0:
        raise DataError(f"{labels} line {line}: label {label} is negative")
    return Example(path, label=label)


def _inside(data: Path, name: str | None, labels: Path, line: int) -> Path:
    """`data / name`, refused if it leaves `data`: output names mirror it under --out."""
    if not name:
        raise DataError(f"{labels} line {line}: a file name is empty")
    path = data / name
    if _relative(data, path).split("/")[0] == "..":
        raise DataError(f"{labels} line {line}: {name} is outside {data}: list files relative to --data")
    return path


def _relative(data: Path, path: Path) -> str:
    """`path` relative to `data`, by name (`..` folded, symbolic links kept: an archive may use them)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(data))).as_posix()


def decode(chunk: Sequence[Example], data: Path, size: int, skipped: list[tuple[str, str]],
           channels: int = 1) -> Batch:
    """Decode like a site: `decode_example` to the card's channels, then float16 as its cache stores images;
    failures skipped."""
    names, images, targets = [], [], []
    for example in chunk:
        name = _relative(data, example.path)
        try:
            image, target = decode_example(example, size, channels=channels)
            if image.ndim != (2 if channels == 1 else 3):
                raise DataError(f"{example.path.name} holds {len(image)} frames: predict takes single-frame images")
        except FedhospError as exc:
            skipped.append((name, str(exc)))
            log.warning("skipped %s: %s", name, exc)
            continue
        names.append(name)
        images.append(image.astype(np.float16).astype(np.float32))
        labelled = example.mask is not None or example.label >= 0
        targets.append(target if labelled else None)
    x = torch.from_numpy(np.stack(images)) if images else torch.empty(0)
    x = x.unsqueeze(1) if x.ndim == 3 else x  # (N, C, H, W)
    return Batch(names, x, targets)


def _chunks(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _write_skipped(out: Path, skipped: list[tuple[str, str]]) -> None:
    path = out / SKIPPED
    if not skipped:
        path.unlink(missing_ok=True)  # a previous run's list would mislead
        return
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("file", "reason"), *skipped])


def _save_png(out: Path, folder: str, name: str, pixels: np.ndarray) -> str:
    """Write under out/folder/, mirroring the image's path, `.png` appended; return the path relative to out."""
    relative = f"{folder}/{name}.png"
    (out / relative).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out / relative)
    return relative


def _check_range(names: list[str], tops: np.ndarray, num_classes: int, what: str) -> None:
    bad = [n for n, top in zip(names, tops, strict=True) if top >= num_classes]
    if bad:
        raise DataError(f"{what} of {len(bad)} file(s) ({', '.join(bad[:3])}) reach {int(tops.max())}, "
                        f"outside the model's {num_classes} classes")


@dataclass
class Classify:
    """Per-class probabilities and the predicted class; HiResCAM heatmaps with --explain."""

    card: ModelCard
    opts: PredictOptions
    names: list[str] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    explained: int = 0

    @property
    def count(self) -> int:
        return len(self.names)

    def header(self) -> list[str]:
        truth = ["label"] if self.opts.labels else []
        return ["file", *truth, *(f"prob_{k}" for k in range(self.card.num_classes)), "predicted"]

    def rows(self, batch: Batch, logits: torch.Tensor, model: nn.Module, device: torch.device) -> list[list[Any]]:
        probs = torch.softmax(logits, dim=1).numpy()
        predicted = decision.predict(probs, self.card.threshold)  # the card's threshold (two classes)
        self.names += batch.names
        self.probs.append(probs)
        self.labels += [int(t) for t in batch.targets if t is not None]
        if self.opts.explain:
            self._explain(batch, predicted, model, device)
        truth = [[t] for t in batch.targets] if self.opts.labels else [[] for _ in batch.targets]
        return [[name, *t, *(f"{p:.6f}" for p in row), int(k)]
                for name, t, row, k in zip(batch.names, truth, probs, predicted, strict=True)]

    def _explain(self, batch: Batch, predicted: np.ndarray, model: nn.Module, device: torch.device) -> None:
        """Two classes: the evidence for class 1 (the finding) even where the model said no, since where it
        almost saw a lesion is what a reader checks; more classes: the evidence for the predicted class."""
        classes = [1] * len(predicted) if self.card.num_classes == 2 else predicted.tolist()
        heat = explain.heatmaps(model, batch.images.to(device), classes)
        for name, image, h in zip(batch.names, batch.images, heat, strict=True):
            _save_png(self.opts.out, EXPLAIN_DIR, name, explain.cam_overlay(image[0].numpy(), h))
            self.explained += 1

    def metrics(self) -> dict[str, Any]:
        """At the card's threshold (the predictions written); two classes, also at 0.5 (`at-0.5`)."""
        labels = np.asarray(self.labels, dtype=np.int64)
        _check_range(self.names, labels, self.card.num_classes, "labels")
        probs = np.concatenate(self.probs)
        report = metrics.classification_report(labels, probs, self.card.threshold)
        if self.card.num_classes == 2:
            report["threshold"] = self.card.threshold if self.card.threshold is not None else decision.DEFAULT
            report[AT_DEFAULT] = metrics.classification_summary(labels, probs, decision.DEFAULT)
        return report


@dataclass
class Segment:
    """Predicted masks as PNG at the model's input size (what it sees); predicted-vs-true overlays with --explain."""

    card: ModelCard
    opts: PredictOptions
    names: list[str] = field(default_factory=list)
    preds: list[torch.Tensor] = field(default_factory=list)  # at the model's input size, as the sites scored
    truths: list[np.ndarray] = field(default_factory=list)
    explained: int = 0

    @property
    def count(self) -> int:
        return len(self.names)

    def header(self) -> list[str]:
        return ["file", "mask", "foreground_fraction"]

    def rows(self, batch: Batch, logits: torch.Tensor, model: nn.Module, device: torch.device) -> list[list[Any]]:
        del model, device  # overlays need no gradients
        pred = logits.argmax(dim=1).to(torch.uint8)
        self.names += batch.names
        self.preds.append(pred)
        self.truths += [t for t in batch.targets if t is not None]
        return [self._row(name, image[0].numpy(), p.numpy(), t)
                for name, image, p, t in zip(batch.names, batch.images, pred, batch.targets, strict=True)]

    def _row(self, name: str, image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> list[Any]:
        pixels = pred * 255 if self.card.num_classes == 2 else pred  # 0/255 reads back as binary
        mask = _save_png(self.opts.out, MASKS_DIR, name, pixels.astype(np.uint8))
        if self.opts.explain:
            _save_png(self.opts.out, EXPLAIN_DIR, name, explain.mask_overlay(image, pred, truth))
            self.explained += 1
        return [name, mask, f"{float((pred > 0).mean()):.6f}"]

    def metrics(self) -> dict[str, Any]:
        target = torch.from_numpy(np.stack(self.truths).astype(np.int64))
        _check_range(self.names, target.flatten(1).max(dim=1).values.numpy(), self.card.num_classes, "mask values")
        pred = torch.cat(self.preds).long()
        k = self.card.num_classes
        scores = {"images": len(self.names), **metrics.segmentation(pred, target, k)}
        return {**scores, **metrics.hausdorff(pred, target, k)}


def summary(result: PredictResult) -> list[str]:
    """What `fedhosp predict` prints after the model card."""
    out = result.out
    lines = [f"predicted {result.predicted} images: {out / PREDICTIONS}"]
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} file(s) that could not be decoded: {out / SKIPPED}")
    if result.card.task == "segmentation":
        lines.append(f"predicted masks: {out / MASKS_DIR}/")
    if result.explained:
        what = "heatmaps" if result.card.task == "classification" else "predicted (red) vs true (green) overlays"
        lines.append(f"{what}: {result.explained} PNGs in {out / EXPLAIN_DIR}/")
    if result.metrics is not None:
        lines += [f"metrics: {out / METRICS}", "  " + _metric_line(result.metrics)]
        if AT_DEFAULT in result.metrics:
            lines[-1] = f"  at threshold {result.metrics['threshold']:g}: " + lines[-1].strip()
            lines.append(f"  at threshold {decision.DEFAULT:g}: " + _metric_line(result.metrics[AT_DEFAULT]))
        if "confusion-matrix" in result.metrics:
            matrix = result.metrics["confusion-matrix"]
            lines.append(f"  confusion matrix (rows: true class, columns: predicted): {matrix}")
    return lines


SHOWN = ("accuracy", "balanced-accuracy", "sensitivity", "specificity", "precision", "recall", "f1", "auc", "ece",
         "dice", "iou", "hausdorff")


def _metric_line(scores: dict[str, Any]) -> str:
    parts = [f"{key} {'n/a' if scores[key] is None else format(scores[key], '.3f')}"
             for key in SHOWN if key in scores]
    return " | ".join(parts)
