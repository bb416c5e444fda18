"""Convert an extracted ADEChallengeData2016 (SceneParse150) archive to the prepared layout.

Layout: ``images/{training,validation}/<name>.jpg`` and ``annotations/{training,validation}/<name>.png``
(uint8, 0 = "other objects", 1..150 = classes). training becomes train and validation becomes test,
as in SimFormer's re-arranged copy. The PNG values go through the class table (dataset_id -> id);
for the shipped 150-class table (dataset_id = id + 1) this is exactly MaskFormer's uint8 ``png - 1``
(0 -> 255). A value the table does not name is an error, since every ADE value is a class.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from weakshot.data.classes import ClassTable
from weakshot.data.prepared import INVALID, Sample, find_root, lookup_table, map_ids, write_prepared

# Archive folder name -> prepared split name.
ADE_SPLITS = {"training": "train", "validation": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg")


def _is_ade_root(folder: Path) -> bool:
    return (folder / "images" / "training").is_dir() and (folder / "annotations" / "training").is_dir()


def read_ade_label(path: Path, lut: np.ndarray) -> tuple[np.ndarray, str]:
    """Decode one annotation PNG into an H x W uint8 map of contiguous ids (255 = ignore)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise ValueError(f"{path}: annotation PNG has mode {image.mode}, expected single-channel L")
            raw = np.asarray(image)
    except OSError as err:
        raise ValueError(f"{path}: cannot read annotation ({err})") from None
    return map_ids(raw, lut, path), "png"


def _samples(root: Path) -> list[Sample]:
    """Every image of both archive splits with its annotation (missing ones are reported later)."""
    samples: list[Sample] = []
    for folder, split in ADE_SPLITS.items():
        image_dir = root / "images" / folder
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{image_dir}: image folder not found")
        for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            samples.append(Sample(split, image.stem, image, root / "annotations" / folder / f"{image.stem}.png"))
    return samples


def convert_ade20k(
    raw: Path,
    out: Path,
    class_table: ClassTable,
    exclude_train: Sequence[str] = (),
    *,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the prepared ADE20K dataset from the extracted archive ``raw`` into ``out``.

    ``exclude_train`` names training images to leave out (SimFormer skips 16 whose labels are
    entirely ignore; ``summary.yaml`` lists such images as ``train_all_ignore``).
    """
    root = find_root(Path(raw), _is_ade_root, "ADE20K folder (images/training and annotations/training)")
    lut = lookup_table(class_table, unknown=INVALID)
    lut[0] = class_table.ignore_label  # 0 = "other objects": not evaluated
    return write_prepared(
        Path(out),
        _samples(root),
        functools.partial(read_ade_label, lut=lut),
        class_table,
        exclude_train=exclude_train,
        source=root,
        workers=workers,
    )
