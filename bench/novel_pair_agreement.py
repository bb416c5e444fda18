"""How often a segmenter's predictions already agree with "same class or not" on pairs of novel pixels.

DistLoss (SimFormer §3.4) can only teach a segmenter *which novel pixels go together*: it pulls the similarity
of two pixels' novel-class scores towards SimNet's verdict on the pair. It says nothing about *which class* a
group of pixels is. This scores the pairwise verdict implied by a model's test predictions ("same predicted
label") against the ground truth, on every ordered pair of ground-truth novel pixels, within an image and
across images, with the same balanced accuracy as ``bench/similarity_transfer.py`` prints for SimNet, so the
two can be set side by side: where the student already groups novel pixels as well as the teacher, distilling
the teacher cannot lift it. It also prints the pixel accuracy on novel pixels and the share of the novel
pixels whose prediction is the majority prediction of their ground-truth region (one class in one image), and
the share of the *wrong* novel pixels that agree with their region: such a pixel is part of a region grouped
together and given the wrong class, an error that no pairwise loss can correct.

    python bench/novel_pair_agreement.py --prepared results/embedded/prepared \\
        --split results/embedded/splits/split4.yaml \\
        results/embedded/predictions/basic/split4/seed0.json results/embedded/predictions/cross_pair/split4/seed0.json

Pairs are counted exactly from per-image contingency tables (no sampling), at the label resolution.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from weakshot.data.classes import ClassTable
from weakshot.evaluation.evaluate import load_split_ids
from weakshot.evaluation.results import iter_results


def pair_counts(contingency: np.ndarray) -> np.ndarray:
    """Ordered pixel pairs of one pixel set (self pairs included): [same gt & same pred, same gt, same pred,
    all], from its (ground truth x prediction) contingency table."""
    n = contingency.sum()
    return np.array(
        [
            (contingency**2).sum(),
            (contingency.sum(1) ** 2).sum(),
            (contingency.sum(0) ** 2).sum(),
            n * n,
        ],
        dtype=np.float64,
    )


def balanced_accuracy(counts: np.ndarray) -> tuple[float, float, float]:
    """(same-class accuracy, different-class accuracy, their mean) from ``pair_counts``-style totals."""
    both, same_gt, same_pred, total = counts
    true_negative = total - same_gt - same_pred + both
    same = both / same_gt
    different = true_negative / (total - same_gt)
    return same, different, (same + different) / 2


def score(predictions: Path, labels_dir: Path, table: ClassTable, novel_ids: list[int]) -> dict[str, float]:
    novel = np.zeros(256, dtype=bool)
    novel[list(novel_ids)] = True
    size = table.num_classes + 1  # the last column gathers uncovered (ignore) predictions
    within = np.zeros(4)
    pooled = np.zeros((size, size), dtype=np.int64)
    correct = agrees_with_region = wrong_but_agrees = pixels = 0
    self_pairs = 0
    for file_name, prediction in iter_results(predictions, table.dataset_id_to_id(), ignore_label=table.ignore_label):
        label_path = labels_dir / f"{Path(file_name).stem}.png"
        with Image.open(label_path) as img:
            label = np.array(img)
        keep = novel[label]
        if not keep.any():
            continue
        gt = label[keep].astype(np.int64)
        pred = np.minimum(prediction[keep].astype(np.int64), table.num_classes)
        contingency = np.zeros((size, size), dtype=np.int64)
        np.add.at(contingency, (gt, pred), 1)
        within += pair_counts(contingency)
        pooled += contingency
        self_pairs += gt.size
        correct += int((gt == pred).sum())
        majority = contingency.argmax(1)  # each ground-truth region's most frequent prediction
        agrees = pred == majority[gt]
        agrees_with_region += int(agrees.sum())
        wrong_but_agrees += int((agrees & (pred != gt)).sum())
        pixels += gt.size
    # Self pairs are trivially "same" on both sides: drop them from every within-image count.
    within_pairs = within - self_pairs
    across_pairs = pair_counts(pooled) - within
    return {
        "within": balanced_accuracy(within_pairs),
        "across": balanced_accuracy(across_pairs),
        "pixel_accuracy": correct / pixels,
        "region_agreement": agrees_with_region / pixels,
        "class_errors": wrong_but_agrees / max(pixels - correct, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, nargs="+", help="COCO-format result files of `weakshot predict`")
    parser.add_argument("--prepared", type=Path, default=Path("results/embedded/prepared"))
    parser.add_argument("--split", type=Path, required=True, help="the split YAML that names the novel classes")
    args = parser.parse_args()
    table = ClassTable.load(args.prepared / "classes.yaml")
    split = load_split_ids(args.split, table.num_classes)
    labels_dir = args.prepared / "labels" / "test"
    print(f"novel pixels of {args.split} ({len(split.novel_ids)} classes); pairs: same-class / different / balanced")
    columns = ("within an image", 20), ("across images", 20), ("pixel acc", 9), ("region", 7), ("class err", 9)
    print(f"{'predictions':<56} " + " ".join(f"{name:>{width}}" for name, width in columns))
    for path in args.predictions:
        s = score(path, labels_dir, table, split.novel_ids)
        within = "/".join(f"{100 * v:.1f}" for v in s["within"])
        across = "/".join(f"{100 * v:.1f}" for v in s["across"])
        print(
            f"{str(path):<56} {within:>20} {across:>20} {100 * s['pixel_accuracy']:>8.1f}% "
            f"{100 * s['region_agreement']:>6.1f}% {100 * s['class_errors']:>8.1f}%"
        )


if __name__ == "__main__":
    main()
