"""Pseudo-labels of the training images from a trained weak-shot model (SimFormer's schedule, step 2).

Per pixel, as SimFormer's ``pseudo_labeling.py``: start from "ignore" (255); give every pixel that the model
predicts as a novel class *named by the image-level labels* that class; then overwrite with the ground-truth
base pixels, which the weak-shot setting always has. Pixels predicted as a base class outside the base masks,
or as a novel class the image does not contain, stay 255. The hidden novel ground truth is read only to report
how good the pseudo-labels are; it never enters them.

The retraining stage (the ``*`` rows) then trains on these PNGs with every class supervised by masks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from weakshot.data.classes import IGNORE_LABEL
from weakshot.data.dataset import TestDataset, read_label
from weakshot.data.splits import load_split, read_split_image_labels
from weakshot.engine.predict import load_model, predict_label_maps
from weakshot.engine.train import pick_device
from weakshot.io_utils import atomic_dir, write_json
from weakshot.model.maskformer import MaskFormer


def pseudo_label(
    prediction: np.ndarray, ground_truth: np.ndarray, base_ids: Iterable[int], present_novel_ids: Iterable[int]
) -> np.ndarray:
    """H x W uint8 pseudo-label from a predicted class map, the image's GT (only its base pixels are read)
    and the novel classes its image-level labels name."""
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} differ in size")
    out = np.full(ground_truth.shape, IGNORE_LABEL, dtype=np.uint8)
    novel = np.isin(prediction, np.fromiter(present_novel_ids, dtype=np.int64))
    out[novel] = prediction[novel]
    base = np.isin(ground_truth, np.fromiter(base_ids, dtype=np.int64))
    out[base] = ground_truth[base]
    return out


class PseudoLabelQuality:
    """Novel-class quality of pseudo-labels against the hidden ground truth, over labelled GT pixels.

    A pseudo-label pixel of 255 counts as "no class": it is a miss for its GT class, not an error for any
    other. Per novel class: IoU = TP / (TP + FP + FN).
    """

    def __init__(self, num_classes: int, novel_ids: Iterable[int]) -> None:
        self.num_classes = num_classes
        self.novel_ids = sorted(novel_ids)
        # Rows GT class, columns pseudo class; column num_classes = 255 (unlabelled by the pseudo-label).
        self.confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, pseudo: np.ndarray, ground_truth: np.ndarray) -> None:
        valid = ground_truth != IGNORE_LABEL
        gt = ground_truth[valid].astype(np.int64)
        ps = pseudo[valid].astype(np.int64)
        ps[ps == IGNORE_LABEL] = self.num_classes
        self.confusion += np.bincount(
            gt * (self.num_classes + 1) + ps, minlength=self.num_classes * (self.num_classes + 1)
        ).reshape(self.num_classes, self.num_classes + 1)

    def compute(self) -> dict:
        c = self.confusion
        novel = np.array(self.novel_ids, dtype=np.int64)
        tp = c[novel, novel].astype(float)
        gt_total = c[novel].sum(1).astype(float)
        pseudo_total = c[:, novel].sum(0).astype(float)
        union = gt_total + pseudo_total - tp
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        labelled_novel = pseudo_total.sum()
        return {
            "novel_mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else None,
            # Of the pixels labelled with a novel class, the share that has that class in the GT.
            "novel_precision": float(tp.sum() / labelled_novel * 100) if labelled_novel else None,
            # Of the GT novel pixels, the share labelled with their class.
            "novel_recall": float(tp.sum() / gt_total.sum() * 100) if gt_total.sum() else None,
            "labelled_fraction": float(1 - c[:, -1].sum() / max(c.sum(), 1)) * 100,
            "per_class_IoU": {int(k): (None if np.isnan(v) else float(v * 100)) for k, v in zip(novel, iou)},
        }


def write_label_folder(
    labelled: Iterator[tuple[str, np.ndarray]],
    prepared: Path,
    split: dict,
    image_labels: dict[str, tuple[list[int], list[int]]],
    num_classes: int,
    out_dir: Path,
    report: Path,
    source: str,
) -> dict:
    """Turn per-image predictions (name, class map at the original resolution) into pseudo-label PNGs in
    ``out_dir`` (atomically: all or nothing) and write the quality report. Shared by every pseudo-labeller."""
    quality = PseudoLabelQuality(num_classes, split["novel_ids"])
    count = 0
    with atomic_dir(out_dir) as tmp:
        for name, prediction in labelled:
            if name not in image_labels:
                raise ValueError(f"no image-level labels for training image {name!r} in the split's label table")
            ground_truth = read_label(Path(prepared) / "labels" / "train" / f"{name}.png")
            label = pseudo_label(prediction, ground_truth, split["base_ids"], image_labels[name][1])
            Image.fromarray(label).save(tmp / f"{name}.png")
            quality.update(label, ground_truth)
            count += 1
    result = {"source": source, "split": split["name"], "num_images": count, **quality.compute()}
    write_json(report, result)
    print(
        f"[pseudo-labels] {count} images -> {out_dir}: novel mIoU {result['novel_mIoU']}, "
        f"precision {result['novel_precision']}, recall {result['novel_recall']}",
        file=sys.stderr,
    )
    return result


def write_pseudo_labels(
    model_dir: Path,
    prepared: Path,
    split: Path,
    image_labels: Path,
    out_dir: Path,
    report: Path,
    *,
    device: str | None = None,
) -> dict:
    """Predict every training image with the segmenter in ``model_dir`` and write ``out_dir/<name>.png``
    pseudo-labels and a quality report (JSON). Returns the report."""
    dev = pick_device(device)
    model, run = load_model(model_dir, dev, expected=MaskFormer)
    dataset = TestDataset(prepared, "train", test_size=run.augment.test_size)
    labelled = ((name, prediction) for name, prediction, _ in predict_label_maps(model, run, dataset, dev))
    return write_label_folder(
        labelled, prepared, load_split(split), read_split_image_labels(image_labels), model.num_classes,
        out_dir, report, source=str(model_dir),
    )  # fmt: skip
