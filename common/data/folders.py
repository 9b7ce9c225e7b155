"""Class sub-folders: `root/<class>/**/image`, the folder name is the label.

Folder names that are all class indices (0, 1, ...) are used as they are; otherwise
the names are sorted and numbered (e.g. benign=0, malignant=1), which every site with
the same class names numbers alike.
"""

from __future__ import annotations

from pathlib import Path

from common.data.example import Example, image_files, is_image_file


def class_folders(root: Path) -> dict[str, int]:
    """{folder name: label}; empty when `root` is not laid out by class (loose images, no image folders)."""
    root = Path(root)
    if any(p.is_file() and is_image_file(p) for p in root.iterdir()):
        return {}
    names = sorted(d.name for d in root.iterdir()
                   if d.is_dir() and not d.name.startswith((".", "_")) and image_files(d))
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


def examples(root: Path, classes: dict[str, int] | None = None) -> list[Example]:
    classes = class_folders(root) if classes is None else classes
    return [Example(p, label=label) for name, label in classes.items() for p in image_files(Path(root) / name)]
