"""Appendix Figures 1-2: rows of test images; columns input, ground truth, base/novel split map (base pixels
red, novel pixels blue), then each method's prediction.

Rows are picked by a rule, not by hand: the test images where the methods disagree most, measured by the
spread (max - min) of the methods' accuracy on the image's novel pixels, preferring images whose novel pixels
cover at least ``min_novel_fraction`` of the labelled pixels (so the comparison is visible); ties go to the
image name; images without novel pixels are never shown. Predictions are
read from the methods' COCO result files, so a figure needs no model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from weakshot.data.classes import IGNORE_LABEL, ClassTable
from weakshot.data.dataset import IMAGE_SUFFIXES, read_image, read_label
from weakshot.data.splits import load_split
from weakshot.engine.predict import class_palette
from weakshot.evaluation.results import read_results
from weakshot.io_utils import atomic_path

SPLIT_COLOURS = {"base": (220, 40, 40), "novel": (40, 90, 230), "ignore": (0, 0, 0)}


def novel_accuracy(prediction: np.ndarray, ground_truth: np.ndarray, novel_ids: np.ndarray) -> float:
    """Share of the image's novel pixels predicted as their class."""
    novel = np.isin(ground_truth, novel_ids)
    return float((prediction[novel] == ground_truth[novel]).mean()) if novel.any() else 0.0


def pick_rows(
    ground_truths: Mapping[str, np.ndarray],
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    novel_ids: list[int],
    count: int,
    min_novel_fraction: float = 0.2,
) -> list[str]:
    """Names of the ``count`` images where the methods' novel-pixel accuracies spread most."""
    novel = np.asarray(novel_ids)
    scored = []
    for name, gt in ground_truths.items():
        novel_pixels = np.isin(gt, novel).sum()
        if not novel_pixels:
            continue
        large = novel_pixels >= min_novel_fraction * (gt != IGNORE_LABEL).sum()
        accuracies = [novel_accuracy(per_method[name], gt, novel) for per_method in predictions.values()]
        scored.append((not large, -(max(accuracies) - min(accuracies)), name))
    return [name for *_, name in sorted(scored)[:count]]


def split_map(ground_truth: np.ndarray, novel_ids: list[int]) -> np.ndarray:
    """H x W x 3: base pixels red, novel pixels blue, unlabelled black."""
    out = np.zeros((*ground_truth.shape, 3), dtype=np.uint8)
    labelled = ground_truth != IGNORE_LABEL
    novel = np.isin(ground_truth, novel_ids)
    out[labelled & ~novel] = SPLIT_COLOURS["base"]
    out[novel] = SPLIT_COLOURS["novel"]
    return out


def split_overlay(image: np.ndarray, ground_truth: np.ndarray, novel_ids: list[int], alpha: float = 0.6) -> np.ndarray:
    """The split map laid over the grey input: its texture shows through, so it does not read as one more flat
    class map (a class colour of the other panels may be red or blue too)."""
    grey = image.astype(np.float32).mean(axis=2, keepdims=True)
    if grey.shape[:2] != ground_truth.shape:  # a test image and its label always match; be safe anyway
        grey = np.full((*ground_truth.shape, 1), 128.0, dtype=np.float32)
    mixed = (1 - alpha) * grey + alpha * split_map(ground_truth, novel_ids).astype(np.float32)
    return mixed.clip(0, 255).astype(np.uint8)


def colourise(label_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[label_map]


def write_figure(
    prepared: Path,
    split: Path,
    predictions: Mapping[str, Path],
    out_png: Path,
    *,
    rows: int = 6,
    title: str = "",
) -> list[str]:
    """Render the figure; returns the names of the images shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prepared = Path(prepared)
    table = ClassTable.load(prepared / "classes.yaml")
    record = load_split(split)
    id_map = table.dataset_id_to_id()
    per_method = {label: read_results(path, id_map) for label, path in predictions.items()}
    names = sorted(next(iter(per_method.values())))
    ground_truths = {name: read_label(prepared / "labels" / "test" / f"{name}.png") for name in names}
    chosen = pick_rows(ground_truths, per_method, record["novel_ids"], rows)
    if not chosen:
        raise ValueError(f"{split}: no test image has enough novel pixels to show")
    palette = np.array(class_palette(table.num_classes), dtype=np.uint8).reshape(-1, 3)

    headers = ["(a) input", "(b) ground truth", "(c) base / novel"] + [
        f"({chr(ord('d') + i)}) {label}" for i, label in enumerate(predictions)
    ]
    maps = [ground_truths[n] for n in chosen] + [per_method[label][n] for label in predictions for n in chosen]
    shown = sorted({int(c) for m in maps for c in np.unique(m) if c != IGNORE_LABEL})
    # The class key goes under the panels in as many columns as its longest name lets fit (fontsize 6: about
    # 0.05 in a character), and as many rows as it then needs, so no name is cut off at any class count.
    width = 1.6 * len(headers)
    entry_width = 0.45 + 0.05 * max(len(_class_label(table.names, c, record["novel_ids"])) for c in shown)
    columns = max(1, int(0.8 * width // entry_width))
    key_height = 0.35 + 0.12 * max(3, -(-len(shown) // columns))
    height = 1.6 * len(chosen) + 0.5 + key_height
    fig, axes = plt.subplots(len(chosen), len(headers), figsize=(width, height))
    axes = np.atleast_2d(axes)
    for r, name in enumerate(chosen):
        image = read_image(_image_path(prepared, name))
        gt = ground_truths[name]
        panels = [image, colourise(gt, palette), split_overlay(image, gt, record["novel_ids"])]
        panels += [colourise(per_method[label][name], palette) for label in predictions]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(headers[c], fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, key_height / height, 1, 1 - 0.4 / height))
    last = chr(ord("d") + len(predictions) - 1)
    _legends(fig, table.names, palette, record["novel_ids"], f"class colours of (b) and (d)-({last})", shown,
             columns, top=key_height / height)  # fmt: skip
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
    return chosen


def _class_label(names: list[str], class_id: int, novel_ids: list[int]) -> str:
    return f"{names[class_id]}{' (novel)' if class_id in novel_ids else ''}"


def _legends(
    fig,
    names: list[str],
    palette: np.ndarray,
    novel_ids: list[int],
    title: str,
    shown: list[int],
    columns: int,
    top: float,
) -> None:
    """Two keys under the panels (below ``top``, a figure fraction): what (c)'s tints mean, and the name of
    every class colour ``shown``, in ``columns`` columns."""
    from matplotlib.patches import Patch

    split_key = [
        Patch(color=np.array(SPLIT_COLOURS[key]) / 255, label=text)
        for key, text in [("base", "(c) base class"), ("novel", "(c) novel class"), ("ignore", "(c) unlabelled")]
    ]
    fig.legend(handles=split_key, loc="upper left", bbox_to_anchor=(0.01, top), fontsize=6, frameon=False)
    class_key = [Patch(color=palette[c] / 255, label=_class_label(names, c, novel_ids)) for c in shown]
    fig.legend(
        handles=class_key, loc="upper left", bbox_to_anchor=(0.17, top), ncol=columns, fontsize=6, frameon=False,
        title=title, title_fontsize=6,
    )  # fmt: skip


def _image_path(prepared: Path, name: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = prepared / "images" / "test" / f"{name}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"{prepared / 'images' / 'test'}: no image named {name}")
