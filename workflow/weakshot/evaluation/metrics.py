"""Semantic-segmentation metrics from a confusion matrix, with detectron2's (and SimFormer's) conventions.

The metric keeps one ``(K+1) x (K+1)`` int64 confusion matrix, ``conf[pred, gt]``, on a torch device. Ground
truth pixels equal to the ignore label (255) are mapped to the extra index ``K``; predictions must lie in
``0..K-1``. Every update is one ``bincount`` of ``(K+1) * pred + gt``, so a batch of any shape costs a single
kernel and the matrix can live on the GPU next to the model outputs.

Conventions of :meth:`SemSegMetric.compute` (those of detectron2's ``SemSegEvaluator`` as SimFormer uses it):

* The ignore row and column are dropped before anything is computed, so a pixel whose ground truth is
  ignored counts nowhere, not even as a false positive of the class predicted there.
* ``tp = diag``, ``pos_gt`` = column sums, ``pos_pred`` = row sums, ``IoU_c = tp / (pos_gt + pos_pred - tp)``
  and ``ACC_c = tp / pos_gt``, both defined only for classes present in the ground truth (``pos_gt > 0``);
  the per-class lists hold ``None`` for the others.
* ``mIoU`` = sum of the defined IoUs / number of classes with ``pos_gt + pos_pred > 0``. A class that is
  predicted but absent from the ground truth therefore counts as an IoU of 0 (the old detectron2 formula).
* ``mACC`` = mean of the defined accuracies, ``pACC`` = ``sum(tp) / sum(pos_gt)``, ``fwIoU`` = IoUs weighted
  by the ground-truth frequency of their class.
* ``base_mIoU`` / ``novel_mIoU`` (and ``*_mACC``) are plain means of the defined per-class values of the
  split's classes (SimFormer's ``BaseIoU`` / ``NovelIoU``): unlike ``mIoU``, predicted-but-absent classes do
  not enter them.
* ``hIoU`` = harmonic mean of ``base_mIoU`` and ``novel_mIoU``; 0 when either is 0. SimFormer's code does not
  compute it; the paper reports it.
* All values are percentages (0-100), as detectron2 reports them. A value with nothing to average over
  (e.g. ``novel_mIoU`` when no novel class occurs in the ground truth) is ``None``, which JSON can store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from weakshot.data.classes import IGNORE_LABEL

ArrayLike = torch.Tensor | np.ndarray


def _as_long_tensor(x: ArrayLike, what: str, device: torch.device) -> torch.Tensor:
    """An integer label map (numpy or torch, any shape) as an int64 tensor on ``device``."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{what}: expected an integer label map, got numpy dtype {x.dtype}")
        # astype first: torch has no uint16/uint32 kernels in every version we support.
        x = torch.from_numpy(np.ascontiguousarray(x).astype(np.int64, copy=False))
    elif isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{what}: expected an integer label map, got torch dtype {x.dtype}")
    else:
        raise TypeError(f"{what}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    return x.to(device=device, dtype=torch.int64, non_blocking=True)


def _mean_or_none(values: np.ndarray) -> float | None:
    """Mean of the non-NaN entries, in percent; None when there are none."""
    values = values[~np.isnan(values)]
    return float(100.0 * values.mean()) if values.size else None


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(100.0 * v) for v in values]


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    """hIoU of two percentages: 0 when either is 0, None when either is undefined."""
    if base is None or novel is None:
        return None
    if base <= 0.0 or novel <= 0.0:
        return 0.0
    return 2.0 * base * novel / (base + novel)


class SemSegMetric:
    """A confusion-matrix accumulator for ``num_classes`` classes plus one ignore bin.

    ``conf[p, g]`` counts pixels predicted as ``p`` whose ground truth is ``g``; index ``num_classes`` is the
    ignore bin of the ground truth (predictions never land there).
    """

    def __init__(
        self, num_classes: int, *, ignore_label: int = IGNORE_LABEL, device: str | torch.device = "cpu"
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"SemSegMetric: num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"SemSegMetric: ignore_label {ignore_label} collides with class ids 0..{num_classes - 1}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.device = torch.device(device)
        size = self.num_classes + 1
        self.confusion = torch.zeros((size, size), dtype=torch.int64, device=self.device)

    def __repr__(self) -> str:
        return f"SemSegMetric(num_classes={self.num_classes}, pixels={self.num_pixels}, device={self.device})"

    @property
    def num_pixels(self) -> int:
        """Pixels seen so far, ignored ones included."""
        return int(self.confusion.sum().item())

    def reset(self) -> None:
        self.confusion.zero_()

    def to(self, device: str | torch.device) -> SemSegMetric:
        """Move the matrix to ``device`` (in place) and return self."""
        self.device = torch.device(device)
        self.confusion = self.confusion.to(self.device)
        return self

    @torch.no_grad()
    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add label maps of any (equal) shape, e.g. ``(H, W)`` or a batch ``(N, H, W)``.

        ``pred`` must hold ids in ``0..K-1``; ``gt`` ids in ``0..K-1`` or the ignore label. Values outside
        raise a ValueError instead of silently landing in the wrong bin.
        """
        if tuple(pred.shape) != tuple(gt.shape):
            raise ValueError(
                f"SemSegMetric.update: prediction shape {tuple(pred.shape)} != ground truth shape {tuple(gt.shape)}"
            )
        pred_t = _as_long_tensor(pred, "prediction", self.device).reshape(-1)
        gt_t = _as_long_tensor(gt, "ground truth", self.device).reshape(-1)
        if pred_t.numel() == 0:
            return
        k = self.num_classes

        bad_pred = (pred_t < 0) | (pred_t >= k)
        if bool(bad_pred.any()):
            value = int(pred_t[bad_pred][0].item())
            raise ValueError(f"SemSegMetric.update: prediction holds {value}; class ids must be in 0..{k - 1}")
        is_ignore = gt_t == self.ignore_label
        bad_gt = ((gt_t < 0) | (gt_t >= k)) & ~is_ignore
        if bool(bad_gt.any()):
            value = int(gt_t[bad_gt][0].item())
            raise ValueError(
                f"SemSegMetric.update: ground truth holds {value}; "
                f"expected class ids 0..{k - 1} or the ignore label {self.ignore_label}"
            )

        gt_t = torch.where(is_ignore, torch.full_like(gt_t, k), gt_t)
        counts = torch.bincount((k + 1) * pred_t + gt_t, minlength=(k + 1) ** 2)
        self.confusion += counts.reshape(k + 1, k + 1)

    def merge(self, other: SemSegMetric) -> SemSegMetric:
        """Add another accumulator's counts (another worker, rank or shard) into this one; returns self."""
        if not isinstance(other, SemSegMetric):
            raise TypeError(f"SemSegMetric.merge: expected a SemSegMetric, got {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_label != self.ignore_label:
            raise ValueError(
                f"SemSegMetric.merge: cannot merge {other.num_classes} classes (ignore {other.ignore_label}) "
                f"into {self.num_classes} classes (ignore {self.ignore_label})"
            )
        self.confusion += other.confusion.to(self.device)
        return self

    def all_reduce(self) -> SemSegMetric:
        """Sum the matrix over all ranks of the default process group (no-op when not distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.confusion, op=torch.distributed.ReduceOp.SUM)
        return self

    def _check_ids(self, ids: Sequence[int], what: str) -> np.ndarray:
        arr = np.asarray(list(ids), dtype=np.int64)
        out_of_range = arr[(arr < 0) | (arr >= self.num_classes)]
        if out_of_range.size:
            raise ValueError(f"SemSegMetric.compute: {what} {out_of_range.tolist()} not in 0..{self.num_classes - 1}")
        return arr

    def compute(self, base_ids: Sequence[int] | None = None, novel_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """Summaries of the counts so far (see the module docstring for the conventions).

        Returns ``per_class_IoU``, ``per_class_ACC`` (lists of K percentages or None), ``mIoU``, ``fwIoU``,
        ``mACC``, ``pACC``, ``num_pixels`` (valid ground-truth pixels); with ``base_ids`` also ``base_mIoU``
        and ``base_mACC``, with ``novel_ids`` ``novel_mIoU`` and ``novel_mACC``, with both ``hIoU``.
        """
        k = self.num_classes
        conf = self.confusion[:k, :k].cpu().numpy().astype(np.float64)
        tp = np.diag(conf)
        pos_gt = conf.sum(axis=0)
        pos_pred = conf.sum(axis=1)
        has_gt = pos_gt > 0
        # detectron2's denominator: classes seen in the ground truth or (on valid pixels) in the prediction.
        seen = (pos_gt + pos_pred) > 0

        iou = np.full(k, np.nan)
        acc = np.full(k, np.nan)
        iou[has_gt] = tp[has_gt] / (pos_gt + pos_pred - tp)[has_gt]
        acc[has_gt] = tp[has_gt] / pos_gt[has_gt]
        total_gt = pos_gt.sum()

        result: dict[str, Any] = {
            "per_class_IoU": _nan_to_none(iou),
            "per_class_ACC": _nan_to_none(acc),
            "mIoU": float(100.0 * iou[has_gt].sum() / seen.sum()) if seen.any() else None,
            "fwIoU": float(100.0 * (iou[has_gt] * pos_gt[has_gt]).sum() / total_gt) if total_gt > 0 else None,
            "mACC": _mean_or_none(acc),
            "pACC": float(100.0 * tp.sum() / total_gt) if total_gt > 0 else None,
            "num_pixels": int(total_gt),
        }

        base = self._check_ids(base_ids, "base_ids") if base_ids is not None else None
        novel = self._check_ids(novel_ids, "novel_ids") if novel_ids is not None else None
        if base is not None and novel is not None:
            both = sorted(set(base.tolist()) & set(novel.tolist()))
            if both:
                raise ValueError(f"SemSegMetric.compute: ids {both} are both base and novel")
        if base is not None:
            result["base_mIoU"] = _mean_or_none(iou[base])
            result["base_mACC"] = _mean_or_none(acc[base])
        if novel is not None:
            result["novel_mIoU"] = _mean_or_none(iou[novel])
            result["novel_mACC"] = _mean_or_none(acc[novel])
        if base is not None and novel is not None:
            result["hIoU"] = harmonic_mean(result["base_mIoU"], result["novel_mIoU"])
        return result
