"""The MVTec AD folder layout: categories, training images, labelled test samples.

``ROOT/<category>/train/good/*``, ``test/good/*``, ``test/<defect>/*`` and
``ground_truth/<defect>/<stem>_mask.png``. The same rules route scored archive paths back to their
category, label, defect and mask. ``ROOT`` is a local folder or a URI (``s3://``, ``gs://``): every listing
and existence check goes through :mod:`stfpm_ray.store.fs`, and image names keep the form of ``ROOT``.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from stfpm_ray.data.images import IMAGE_EXTENSIONS
from stfpm_ray.errors import UserError
from stfpm_ray.store.fs import is_dir, is_file, join, list_dir


class DatasetError(UserError):
    """A data folder that does not have the expected layout; the message says what is missing."""


@dataclass(frozen=True)
class Sample:
    """One image with what the layout says about it (label/defect/mask are None outside MVTec test)."""

    path: str
    category: str
    label: int | None = None
    defect: str | None = None
    mask_path: str | None = None


def images_in(folder: str) -> list[str]:
    """Image files directly in ``folder``, sorted, by extension (case-insensitive)."""
    return [
        join(folder, entry.base_name)
        for entry in list_dir(folder)
        if entry.type == pafs.FileType.File and posixpath.splitext(entry.base_name)[1].lower() in IMAGE_EXTENSIONS
    ]


def _subfolders(folder: str) -> list[str]:
    return [entry.base_name for entry in list_dir(folder) if entry.type == pafs.FileType.Directory]


def _require_dir(path: str, what: str) -> str:
    if not is_dir(path):
        raise DatasetError(f"{what} {path} does not exist or is not a folder")
    return path


def discover_categories(root: str | Path) -> list[str]:
    """Category folders under an MVTec-layout root (those with ``train/good`` or ``test``)."""
    root = _require_dir(str(root), "data root")
    found = sorted(
        name
        for name in _subfolders(root)
        # `.`/`_` folders are staging or bookkeeping (a half-written synthetic category, run state)
        if name[0] not in "._" and (is_dir(join(root, name, "train", "good")) or is_dir(join(root, name, "test")))
    )
    if not found:
        raise DatasetError(
            f"no categories under {root}: expected ROOT/<category>/train/good/*.png "
            "(MVTec AD layout; `stfpm-ray synth` writes an example)"
        )
    return found


def resolve_categories(root: str | Path, requested: str) -> list[str]:
    """``all`` or a comma-separated list, checked against what exists under ``root``."""
    available = discover_categories(root)
    if requested == "all":
        return available
    wanted = [name.strip() for name in requested.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise DatasetError(f"categories {unknown} not found under {root}; available: {', '.join(available)}")
    return wanted


def train_images(root: str | Path, category: str) -> list[str]:
    """The defect-free training images of a category; an empty category is an error."""
    folder = _require_dir(join(root, category, "train", "good"), f"training folder of {category!r}")
    images = images_in(folder)
    if not images:
        raise DatasetError(f"category {category!r} has no training images in {folder} ({IMAGE_EXTENSIONS})")
    return images


def mask_path_for(image: str | Path) -> str | None:
    """Ground-truth mask of an MVTec test image, or None for good images and missing masks.

    Works on local paths and URIs alike (``s3://bucket/mvtec/bottle/test/broken_large/000.png``): the mask's
    name is derived from the path as text and its existence checked through :mod:`stfpm_ray.store.fs`.
    """
    parts = str(image).replace(os.sep, "/").split("/")
    if len(parts) < 4 or parts[-2] == "good":
        return None
    stem = posixpath.splitext(parts[-1])[0]
    mask = "/".join([*parts[:-3], "ground_truth", parts[-2], f"{stem}_mask.png"])
    return mask if is_file(mask) else None


def _parts(path: str | Path) -> list[str]:
    return str(path).replace(os.sep, "/").rstrip("/").split("/")


def is_training_image(path: str | Path) -> bool:
    """An image under ``<category>/train/<kind>/``: what a model learnt from, not what it is judged on."""
    parts = _parts(path)
    return len(parts) >= 4 and parts[-3] == "train"


def is_mask(path: str | Path) -> bool:
    """A ground-truth mask (``<category>/ground_truth/<defect>/*``): never an input image."""
    parts = _parts(path)
    return len(parts) >= 3 and parts[-3] == "ground_truth"


def category_for(path: str | Path, category: str | None = None) -> str:
    """The category a path belongs to, from its text alone (no file-system call, so planning a night over
    millions of archived paths stays cheap): ``category`` if given, else the folder above
    ``train``/``test`` when the path has one, else the parent folder's name."""
    if category is not None:
        return category
    parts = _parts(path)
    if len(parts) >= 4 and parts[-3] in ("test", "train"):
        return parts[-4]
    return parts[-2] if len(parts) >= 2 else ""


def sample_for(path: str | Path, category: str | None = None) -> Sample:
    """Route an image path: inside ``<cat>/test/<defect>/`` it gets label, defect and mask (one existence
    check for the mask), elsewhere only the category of :func:`category_for`."""
    parts = _parts(path)
    if len(parts) >= 4 and parts[-3] == "test":
        defect = parts[-2]
        return Sample(
            path=str(path),
            category=category_for(path, category),
            label=0 if defect == "good" else 1,
            defect=defect,
            mask_path=mask_path_for(path),
        )
    return Sample(path=str(path), category=category_for(path, category))


def test_samples(root: str | Path, category: str) -> list[Sample]:
    """Labelled test samples of a category, good and every defect folder."""
    test_dir = _require_dir(join(root, category, "test"), f"test folder of {category!r}")
    samples = [
        sample_for(image) for defect in sorted(_subfolders(test_dir)) for image in images_in(join(test_dir, defect))
    ]
    if not samples:
        raise DatasetError(f"category {category!r} has no test images under {test_dir}")
    return samples
