"""Where a site's examples come from: one small contract, whatever the hospital's layout.

Every source yields `Example`s; `load(root, task)` picks the source from what is on disk:
1. a manifest, `labels.csv` (`file,label`, or `series,label` / `study,label` by DICOM UID)
   or, for segmentation, `masks.csv` (`file,mask`): images are DICOM, PNG or JPEG;
2. a MedMNIST-style `.npz` (train/val/test arrays; its splits are kept);
3. class sub-folders: `root/<class>/...`, the folder name is the label.
Paths in a manifest are relative to the folder.
"""

from __future__ import annotations

from pathlib import Path

from common.data import folders, manifest, npz
from common.data.example import (
    DICOM_SUFFIXES,
    MANIFEST,
    MANIFESTS,
    MASK_MANIFEST,
    RASTER_SUFFIXES,
    Example,
    image_files,
    is_image_file,
)
from common.errors import DataError

__all__ = ["DICOM_SUFFIXES", "MANIFEST", "MANIFESTS", "MASK_MANIFEST", "RASTER_SUFFIXES", "Example",
           "dicom_folder", "image_files", "is_image_file", "load"]


def load(root: Path, task: str = "classification") -> list[Example]:
    """The examples of a site's folder, from whichever source it holds; DataError names the path otherwise."""
    root = Path(root)
    if root.is_file() and root.suffix == ".npz":
        raise DataError(f"{root} is a file: point the site's data-path at the folder that holds it")
    manifest_name, column = MANIFESTS[task]
    if not root.is_dir() or (root / manifest_name).is_file():
        return dicom_folder(root, task)
    archives = sorted(root.glob("*.npz"))
    if archives:
        return npz.examples(root, archives, task)
    if task == "classification" and folders.class_folders(root):
        return folders.examples(root)
    if not any(root.iterdir()):
        raise DataError(f"data folder {root} is empty: put the site's DICOM files there")
    layouts = f"{manifest_name} (file,{column})"
    if task == "classification":
        layouts += ", a MedMNIST-style .npz, or one sub-folder of images per class"
    raise DataError(f"{root} holds none of the layouts fedhosp reads: add {layouts}")


def dicom_folder(root: Path, task: str = "classification") -> list[Example]:
    """The examples a manifest lists; every problem names the file and the fix."""
    root = Path(root)
    name, column = MANIFESTS[task]
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: check the site's data-path")
    path = root / name
    if not path.is_file():
        if not any(root.iterdir()):
            raise DataError(f"data folder {root} is empty: put the site's DICOM files there")
        raise DataError(f"{path} is missing: add a CSV with columns file,{column}")
    return manifest.read(path, column)
