"""Score a COCO stuff-segmentation result file against a folder of prepared label PNGs.

This is the ``evaluate`` stage: it mirrors SimFormer's ``WeakShotSemSegEvaluator`` (detectron2's
``SemSegEvaluator`` plus base/novel summaries) but reads predictions from a result file instead of a model, so
the metric is independent of how the predictions were made. The metric is computed at the label's own
(original) resolution; resizing predictions back is the job of whoever writes the result file.

Matching: the label ``<name>.png`` belongs to the result entries whose ``file_name`` has the base name
``<name>``, with or without its extension (detectron2 stores the image path, e.g. ``.../<name>.jpg``). Every
label must have a prediction and every prediction a label, so a truncated or mismatched result file fails
loudly instead of scoring a subset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image

from weakshot.data.classes import ClassTable
from weakshot.evaluation.metrics import SemSegMetric
from weakshot.evaluation.results import decode_image, load_result_entries
from weakshot.io_utils import read_yaml, write_json

_SHOW = 5  # how many offending image names an error lists


@dataclass(frozen=True)
class SplitIds:
    """Base and novel class ids of one weak-shot split."""

    name: str
    base_ids: tuple[int, ...]
    novel_ids: tuple[int, ...]


def load_split_ids(path: str | os.PathLike, num_classes: int) -> SplitIds:
    """Read ``base_ids`` / ``novel_ids`` of a split YAML and check them against the class table."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a split file must be a mapping with 'base_ids' and 'novel_ids'")
    ids: dict[str, tuple[int, ...]] = {}
    for key in ("base_ids", "novel_ids"):
        value = data.get(key)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{path}: '{key}' must be a list of integer class ids, got {value!r}")
        out_of_range = [v for v in value if not 0 <= v < num_classes]
        if out_of_range:
            raise ValueError(f"{path}: '{key}' holds {out_of_range}, outside the class ids 0..{num_classes - 1}")
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"{path}: '{key}' lists {repeated} more than once")
        ids[key] = tuple(value)
    both = sorted(set(ids["base_ids"]) & set(ids["novel_ids"]))
    if both:
        raise ValueError(f"{path}: class ids {both} are both in 'base_ids' and 'novel_ids'")
    declared = data.get("num_classes")
    if declared is not None and declared != num_classes:
        raise ValueError(f"{path}: 'num_classes' is {declared} but the class table has {num_classes} classes")
    return SplitIds(str(data.get("name") or path.stem), ids["base_ids"], ids["novel_ids"])


def _read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            label = np.array(img)
    except OSError as err:
        raise ValueError(f"{path}: cannot read the label PNG: {err}") from None
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"{path}: a label must be a single-channel uint8 PNG, got shape {label.shape} {label.dtype}")
    return label


def _names(names: list[str]) -> str:
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(repr(n) for n in names[:_SHOW]) + more


def _match_predictions(
    predictions: Path, file_names: list[str], label_names: set[str]
) -> tuple[dict[str, str], list[str]]:
    """Map label name -> result ``file_name``; also return the result names that match no label."""
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for file_name in file_names:
        base = PurePath(file_name).name
        name = base if base in label_names else PurePath(base).stem
        if name not in label_names:
            unmatched.append(file_name)
            continue
        if name in matched:
            raise ValueError(f"{predictions}: {matched[name]!r} and {file_name!r} both predict the image {name!r}")
        matched[name] = file_name
    return matched, unmatched


def evaluate_result_file(
    predictions: str | os.PathLike,
    *,
    labels_dir: str | os.PathLike,
    classes: str | os.PathLike,
    split: str | os.PathLike | None = None,
    out: str | os.PathLike,
) -> dict[str, Any]:
    """Score ``predictions`` against every ``*.png`` of ``labels_dir``; write and return the metrics dict.

    The dict holds ``num_images``, ``mIoU``, ``base_mIoU``, ``novel_mIoU``, ``hIoU``, ``pACC``, ``mACC``,
    ``fwIoU``, ``base_mACC``, ``novel_mACC``, ``per_class`` (``id``, ``name``, ``IoU``, ``ACC``, ``split``) and
    ``split`` (the split name); the base/novel values are None without a split file. Percentages, 0-100.
    """
    predictions, labels_dir = Path(predictions), Path(labels_dir)
    table = ClassTable.load(classes)
    split_ids = load_split_ids(split, table.num_classes) if split is not None else None

    if not labels_dir.is_dir():
        raise FileNotFoundError(f"{labels_dir}: label folder not found")
    label_paths = {p.stem: p for p in sorted(labels_dir.glob("*.png"))}
    if not label_paths:
        raise ValueError(f"{labels_dir}: no label PNGs to evaluate against")

    by_image = load_result_entries(predictions)
    matched, unmatched = _match_predictions(predictions, list(by_image), set(label_paths))
    if unmatched:
        raise ValueError(
            f"{predictions}: {len(unmatched)} predicted image(s) have no label in {labels_dir}: {_names(unmatched)}"
        )
    missing = [name for name in label_paths if name not in matched]
    if missing:
        raise ValueError(
            f"{predictions}: no prediction for {len(missing)} of the {len(label_paths)} labels in {labels_dir}: "
            f"{_names(missing)}"
        )

    metric = SemSegMetric(table.num_classes, ignore_label=table.ignore_label)
    dataset_id_to_id = table.dataset_id_to_id()
    for name, label_path in label_paths.items():
        file_name = matched[name]
        pred = decode_image(
            predictions, file_name, by_image[file_name], dataset_id_to_id, ignore_label=table.ignore_label
        )
        gt = _read_label(label_path)
        if pred.shape != gt.shape:
            raise ValueError(
                f"{predictions}: the prediction of image {name!r} is {pred.shape[0]}x{pred.shape[1]} but its label "
                f"{label_path} is {gt.shape[0]}x{gt.shape[1]}; predictions must be at the original resolution"
            )
        if (pred == table.ignore_label).any():
            # detectron2 predicts every pixel; an uncovered pixel would otherwise vanish from the metric.
            raise ValueError(f"{predictions}: the segments of image {name!r} leave pixels without a class")
        try:
            metric.update(pred, gt)
        except ValueError as err:
            raise ValueError(f"{label_path}: {err}") from None

    base_ids = split_ids.base_ids if split_ids else None
    novel_ids = split_ids.novel_ids if split_ids else None
    scores = metric.compute(base_ids=base_ids, novel_ids=novel_ids)

    def split_of(class_id: int) -> str | None:
        if split_ids is None:
            return None
        if class_id in split_ids.base_ids:
            return "base"
        return "novel" if class_id in split_ids.novel_ids else None

    result: dict[str, Any] = {
        "num_images": len(label_paths),
        "mIoU": scores["mIoU"],
        "base_mIoU": scores.get("base_mIoU"),
        "novel_mIoU": scores.get("novel_mIoU"),
        "hIoU": scores.get("hIoU"),
        "pACC": scores["pACC"],
        "mACC": scores["mACC"],
        "fwIoU": scores["fwIoU"],
        "base_mACC": scores.get("base_mACC"),
        "novel_mACC": scores.get("novel_mACC"),
        "per_class": [
            {
                "id": c.id,
                "name": c.name,
                "IoU": scores["per_class_IoU"][c.id],
                "ACC": scores["per_class_ACC"][c.id],
                "split": split_of(c.id),
            }
            for c in table.classes
        ],
        "split": split_ids.name if split_ids else None,
    }
    write_json(out, result)
    return result
