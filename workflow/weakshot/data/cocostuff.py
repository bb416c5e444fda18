"""Convert an extracted COCO-Stuff-10K archive (v1.0 or v1.1) to the prepared layout.

Both releases share the layout ``images/<name>.jpg``, ``annotations/<name>.mat`` and
``imageLists/{train,test}.txt`` but differ in the ``.mat`` files:

* v1.0 (what MaskFormer and SimFormer use): MATLAB v7.3 = HDF5. h5py sees the column-major ``S``
  as W x H, so it is transposed; ids are 1 = unlabeled, 2..172 = the 171 classes in COCO-id order,
  and MaskFormer's ``S - 2`` in uint8 turns them into 255 and 0..170.
* v1.1: MATLAB v5 (scipy.io.loadmat), ``S`` holds raw COCO ids: 0 = unlabeled, 11 ids unused. They
  go through the class table (dataset_id -> id), unnamed ids -> 255, which gives the same PNGs as
  v1.0 for the 171-class table.

The version is detected per file, so a mixed folder also converts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io

from weakshot.data.classes import ClassTable
from weakshot.data.prepared import (
    INVALID,
    SPLITS,
    Sample,
    find_root,
    lookup_table,
    map_ids,
    write_prepared,
)

V10_NUM_CLASSES = 171  # v1.0 ids 2..172
V10_FIRST_CLASS = 2


def _v10_lookup(ignore_label: int) -> np.ndarray:
    """v1.0 raw id -> contiguous id: MaskFormer's uint8 ``S - 2`` (1 -> 255, 2..172 -> 0..170).

    Raw 0 does not occur in v1.0; ``S - 2`` would make it 254, an id that exists in no table, so it
    is treated as unlabeled instead. Ids above 172 are errors.
    """
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[0] = ignore_label
    lut[1] = ignore_label
    lut[V10_FIRST_CLASS : V10_FIRST_CLASS + V10_NUM_CLASSES] = np.arange(V10_NUM_CLASSES)
    return lut


def _v10_compatible(class_table: ClassTable) -> bool:
    """v1.0 ids are positions in the 171 used COCO ids, ascending: the table must be ordered that way."""
    dataset_ids = [c.dataset_id for c in class_table.classes]
    return len(dataset_ids) == V10_NUM_CLASSES and dataset_ids == sorted(dataset_ids)


def read_cocostuff_label(
    path: Path, lut_v11: np.ndarray, lut_v10: np.ndarray, v10_compatible: bool
) -> tuple[np.ndarray, str]:
    """Decode one annotation ``.mat`` (either version) into an H x W uint8 map of contiguous ids."""
    if h5py.is_hdf5(path):
        if not v10_compatible:
            raise ValueError(
                f"{path}: COCO-Stuff-10K v1.0 annotation (HDF5), which needs the 171-class table in "
                "COCO-id order; the given class table differs"
            )
        with h5py.File(path, "r") as f:
            if "S" not in f:
                raise ValueError(f"{path}: no 'S' variable in this v1.0 (HDF5) annotation")
            raw = np.array(f["S"])
        # MATLAB writes column-major, so h5py reads W x H: transpose back to H x W.
        return map_ids(raw.T, lut_v10, path), "v1.0"
    try:
        mat = scipy.io.loadmat(path, variable_names=["S"])
    except (ValueError, TypeError, OSError, NotImplementedError) as err:
        raise ValueError(f"{path}: not a readable MATLAB annotation file ({err})") from None
    if "S" not in mat:
        raise ValueError(f"{path}: no 'S' variable in this v1.1 (MATLAB v5) annotation")
    return map_ids(mat["S"], lut_v11, path), "v1.1"


def _read_list(path: Path) -> list[str]:
    """Image names of one split list, one per line, without extension."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _samples(root: Path) -> list[Sample]:
    return [
        Sample(split, name, root / "images" / f"{name}.jpg", root / "annotations" / f"{name}.mat")
        for split in SPLITS
        for name in _read_list(root / "imageLists" / f"{split}.txt")
    ]


def convert_cocostuff(
    raw: Path,
    out: Path,
    class_table: ClassTable,
    exclude_train: Sequence[str] = (),
    *,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the prepared COCO-Stuff-10K dataset from the extracted archive ``raw`` into ``out``.

    ``exclude_train`` names training images to leave out (SimFormer skips 7); ``workers`` defaults
    to the usable CPUs (at most 8). Returns the summary also written to ``out/summary.yaml``.
    """
    root = find_root(Path(raw), lambda folder: (folder / "imageLists").is_dir(), "COCO-Stuff-10K folder (imageLists/)")
    reader = functools.partial(
        read_cocostuff_label,
        lut_v11=lookup_table(class_table, unknown=class_table.ignore_label),
        lut_v10=_v10_lookup(class_table.ignore_label),
        v10_compatible=_v10_compatible(class_table),
    )
    summary = write_prepared(
        Path(out),
        _samples(root),
        reader,
        class_table,
        exclude_train=exclude_train,
        source=root,
        workers=workers,
    )
    return summary
