"""Difficulty check of the embedded dataset: how far does colour alone get?

Trains two per-pixel classifiers that see only a pixel's RGB value, on CPU:

(a) logistic regression (a 1x1 convolution), and
(b) a small per-pixel MLP (3-128-128-C),

on pixels sampled from the training images, and prints the test-set mIoU over all classes (plus stuff and
thing means) and the timings. datasets.md asks for a colour-only mIoU well below 30; calibration.md measured
6.5 (logistic) and 15.8 (MLP) on its toy. A high number here means colour names classes and the dataset is
too easy for the weak-shot question.

Data: by default the default embedded dataset is generated into a temporary folder and read straight from
its raw archive; ``--archive`` reads an existing raw archive, ``--prepared DIR`` a prepared dataset
(``images/{train,test}/*.jpg``, ``labels/{train,test}/*.png`` with 255 = ignore, ``classes.yaml``).

    python bench/colour_baseline.py [--prepared DIR | --archive ZIP | --spec JSON] [--pixels 200000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from weakshot.data.classes import IGNORE_LABEL, ClassTable
from weakshot.data.embedded import EmbeddedConfig, generate_embedded, iter_archive


@dataclass(frozen=True)
class Split:
    rgb: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N, H, W) uint8 train ids, 255 = ignore


@dataclass(frozen=True)
class Data:
    train: Split
    test: Split
    table: ClassTable


def _stack(items: list[tuple[np.ndarray, np.ndarray]], where: str) -> Split:
    if not items:
        raise ValueError(f"{where}: no images found")
    return Split(np.stack([rgb for rgb, _ in items]), np.stack([lab for _, lab in items]))


def load_archive(archive: Path, table: ClassTable) -> Data:
    """Read a raw embedded archive; raw ids 1..C become train ids 0..C-1 and 0 (unlabeled) becomes 255."""
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for c in table.classes:
        lut[c.dataset_id] = c.id
    splits = {
        split: _stack([(rgb, lut[raw]) for _, rgb, raw in iter_archive(archive, split)], f"{archive}:{split}")
        for split in ("train", "test")
    }
    return Data(splits["train"], splits["test"], table)


def load_prepared(root: Path) -> Data:
    """Read a prepared dataset folder (the pipeline's converter output)."""
    table_path = root / "classes.yaml"
    if not table_path.exists():
        raise FileNotFoundError(f"{table_path}: a prepared dataset needs its class table")
    table = ClassTable.load(table_path)
    splits = {}
    for split in ("train", "test"):
        items = []
        for label_path in sorted((root / "labels" / split).glob("*.png")):
            image_path = root / "images" / split / f"{label_path.stem}.jpg"
            with Image.open(image_path) as img:
                rgb = np.asarray(img.convert("RGB"))
            with Image.open(label_path) as lab:
                items.append((rgb, np.asarray(lab)))
        splits[split] = _stack(items, str(root / "labels" / split))
    return Data(splits["train"], splits["test"], table)


def sample_pixels(split: Split, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` labelled training pixels, uniformly over all labelled pixels of the split."""
    rgb = split.rgb.reshape(-1, 3)
    labels = split.labels.reshape(-1)
    valid = np.flatnonzero(labels != IGNORE_LABEL)
    pick = rng.choice(valid, size=min(count, len(valid)), replace=False)
    return rgb[pick], labels[pick]


def make_model(kind: str, num_classes: int) -> nn.Module:
    if kind == "logistic":
        return nn.Linear(3, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(3, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, num_classes))
    raise ValueError(f"unknown model kind {kind!r}")


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _features(rgb: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (torch.from_numpy(rgb.reshape(-1, 3).astype(np.float32) / 255.0) - mean) / std


@torch.no_grad()
def predict(model: nn.Module, split: Split, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    out = []
    for start in range(0, len(split.rgb), 64):
        chunk = split.rgb[start : start + 64]
        logits = model(_features(chunk, mean, std))
        out.append(logits.argmax(1).numpy().astype(np.uint8).reshape(chunk.shape[:3]))
    return np.concatenate(out)


def per_class_iou(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """mIoU (percent) and per-class IoU (NaN for classes absent from the ground truth), with the project's
    metric when it is importable, else with a local confusion matrix of the same convention."""
    try:
        from weakshot.evaluation.metrics import SemSegMetric
    except ImportError:
        SemSegMetric = None  # noqa: N806
    if SemSegMetric is not None:
        metric = SemSegMetric(num_classes)
        metric.update(pred, gt)
        result = metric.compute()
        iou = np.array([np.nan if v is None else v / 100 for v in result["per_class_IoU"]])
        return float(result["mIoU"]), iou
    valid = gt != IGNORE_LABEL
    conf = np.bincount(num_classes * pred[valid].astype(np.int64) + gt[valid], minlength=num_classes**2)
    conf = conf.reshape(num_classes, num_classes).astype(float)  # conf[pred, gt]
    tp, pos_gt, pos_pred = np.diag(conf), conf.sum(0), conf.sum(1)
    iou = np.where(pos_gt > 0, tp / np.maximum(pos_gt + pos_pred - tp, 1), np.nan)
    seen = (pos_gt + pos_pred) > 0
    return float(100 * np.nansum(iou) / max(seen.sum(), 1)), iou


def run(data: Data, *, pixels: int, seed: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    rgb, labels = sample_pixels(data.train, pixels, rng)
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0)
    mean, std = x.mean(0), x.std(0)
    x = (x - mean) / std
    y = torch.from_numpy(labels.astype(np.int64))
    kinds = np.array([c.kind for c in data.table.classes])
    results = {}
    # Step counts where both models have converged on the default dataset (4x more steps moved mIoU < 0.2).
    for kind, steps, batch, lr in (("logistic", 600, 1024, 5e-2), ("mlp", 800, 1024, 3e-3)):
        torch.manual_seed(seed)
        model = make_model(kind, data.table.num_classes)
        t0 = time.perf_counter()
        train(model, x, y, steps=steps, batch=batch, lr=lr, seed=seed)
        t1 = time.perf_counter()
        pred = predict(model, data.test, mean, std)
        miou, iou = per_class_iou(pred, data.test.labels, data.table.num_classes)
        t2 = time.perf_counter()
        results[kind] = {
            "mIoU": miou,
            "stuff_mIoU": float(100 * np.nanmean(iou[kinds == "stuff"])),
            "thing_mIoU": float(100 * np.nanmean(iou[kinds == "thing"])),
            "best_class_IoU": float(100 * np.nanmax(iou)),
            "train_s": t1 - t0,
            "eval_s": t2 - t1,
            "steps": steps,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prepared", type=Path, help="prepared dataset folder")
    source.add_argument("--archive", type=Path, help="raw embedded archive (needs --classes)")
    parser.add_argument("--classes", type=Path, help="class table of --archive")
    parser.add_argument("--spec", type=json.loads, default={}, help="embedded generator settings (JSON)")
    parser.add_argument("--pixels", type=int, default=200_000, help="sampled training pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.prepared:
        data, source_name = load_prepared(args.prepared), str(args.prepared)
    elif args.archive:
        if not args.classes:
            parser.error("--archive needs --classes")
        data, source_name = load_archive(args.archive, ClassTable.load(args.classes)), str(args.archive)
    else:
        cfg = EmbeddedConfig.from_dict(args.spec)
        with tempfile.TemporaryDirectory() as tmp:
            archive, classes = Path(tmp) / "embedded.zip", Path(tmp) / "classes.yaml"
            t_gen = time.perf_counter()
            generate_embedded(cfg, archive=archive, classes=classes)
            print(
                f"generated {cfg.num_train} + {cfg.num_test} images at {cfg.image_size} px "
                f"in {time.perf_counter() - t_gen:.1f} s"
            )
            data, source_name = load_archive(archive, ClassTable.load(classes)), f"embedded {json.dumps(args.spec)}"
    t_load = time.perf_counter() - t0
    print(
        f"data: {source_name}: {len(data.train.rgb)} train / {len(data.test.rgb)} test images, "
        f"{data.table.num_classes} classes ({t_load:.1f} s to prepare and load)"
    )

    results = run(data, pixels=args.pixels, seed=args.seed)
    print(f"colour-only per-pixel classifiers, {args.pixels} training pixels, {args.threads} threads:")
    print(f"{'model':<10} {'mIoU':>6} {'stuff':>6} {'thing':>6} {'best':>6} {'steps':>6} {'train s':>8} {'eval s':>7}")
    for kind, r in results.items():
        print(
            f"{kind:<10} {r['mIoU']:6.1f} {r['stuff_mIoU']:6.1f} {r['thing_mIoU']:6.1f} {r['best_class_IoU']:6.1f} "
            f"{r['steps']:6d} {r['train_s']:8.1f} {r['eval_s']:7.1f}"
        )


if __name__ == "__main__":
    main()
