"""Base/novel class splits and image-level labels.

Two sources of splits:

* ``paper``: the published splits of SimFormer, read from ``config/paper_splits.yaml`` (COCO-Stuff-10K
  Splits 1-9, ADE20K Splits 1-4).
* ``random``: for the embedded dataset. Splits 1..n draw ``round(C * novel_fraction)`` novel classes at
  random (Python's ``round``, as SimFormer's ``round(K / 4)``). The extra splits are built the way the
  paper built Splits 5-9: a fixed seeded order starts with the last random split's novel classes and
  continues with its base classes shuffled; split ``n + k`` takes the first ``int(C * ratio_k)`` classes
  of that order as novel, so every extra split is a superset of the one before.

A split is a small YAML file (dataset, name, base/novel ids and names, novel ratio). Image-level labels
are a TSV derived once per dataset (the classes present in each training image) and, beside each split,
the same table divided into the base and novel classes of that split.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from weakshot.data.classes import ClassTable
from weakshot.io_utils import atomic_path, read_yaml, write_yaml


@dataclass(frozen=True)
class SplitSpec:
    source: str  # "paper" or "random"
    # source == "paper"
    reference: str | None = None  # path of paper_splits.yaml
    reference_key: str | None = None  # dataset key inside it
    # source == "random"
    num_random: int = 4
    novel_fraction: float = 0.25
    extra_novel_ratios: tuple[float, ...] = field(default=(0.30, 0.35, 0.40, 0.45, 0.50))
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> SplitSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"split settings: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        data = dict(data)
        if "extra_novel_ratios" in data:
            data["extra_novel_ratios"] = tuple(float(r) for r in data["extra_novel_ratios"])
        spec = cls(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.source == "paper":
            if not self.reference or not self.reference_key:
                raise ValueError("split settings: source 'paper' needs 'reference' and 'reference_key'")
        elif self.source == "random":
            if self.num_random < 1:
                raise ValueError("split settings: 'num_random' must be at least 1")
            if not 0.0 < self.novel_fraction < 1.0:
                raise ValueError("split settings: 'novel_fraction' must lie strictly between 0 and 1")
            ratios = list(self.extra_novel_ratios)
            if ratios != sorted(ratios) or any(not self.novel_fraction <= r < 1.0 for r in ratios):
                raise ValueError(
                    "split settings: 'extra_novel_ratios' must increase, from 'novel_fraction' up to below 1"
                )
        else:
            raise ValueError(f"split settings: 'source' must be 'paper' or 'random', not {self.source!r}")


def _random_splits(num_classes: int, spec: SplitSpec) -> dict[str, list[int]]:
    """Novel ids (in draw order) of every split of a randomly split dataset."""
    num_novel = round(num_classes * spec.novel_fraction)
    splits: dict[str, list[int]] = {}
    for index in range(1, spec.num_random + 1):
        rng = np.random.default_rng([spec.seed, index])
        splits[f"split{index}"] = [int(c) for c in rng.choice(num_classes, size=num_novel, replace=False)]
    # The paper's Splits 5-9 extend Split 4 by a fixed permutation; ours extend the last random split.
    last = splits[f"split{spec.num_random}"]
    rest = [c for c in range(num_classes) if c not in set(last)]
    order = last + [int(c) for c in np.random.default_rng([spec.seed, 0]).permutation(rest)]
    for offset, ratio in enumerate(spec.extra_novel_ratios, start=1):
        count = int(num_classes * ratio)
        if count < len(last):
            raise ValueError(f"split settings: ratio {ratio} gives fewer novel classes than the random splits")
        splits[f"split{spec.num_random + offset}"] = order[:count]
    return splits


def _paper_splits(class_table: ClassTable, spec: SplitSpec) -> dict[str, list[int]]:
    reference = read_yaml(spec.reference)
    if spec.reference_key not in reference:
        raise KeyError(f"{spec.reference}: no dataset key {spec.reference_key!r}")
    entry = reference[spec.reference_key]
    if entry["num_classes"] != class_table.num_classes or entry["class_names"] != class_table.names:
        raise ValueError(
            f"{spec.reference}: the class list of {spec.reference_key!r} differs from the class table of "
            f"{class_table.dataset!r}"
        )
    splits = {}
    for name in entry["split_names"]:
        try:
            splits[name] = [int(i) for i in entry[name]["novel_ids"]]
        except KeyError:
            raise KeyError(f"{spec.reference}: {spec.reference_key}.{name}.novel_ids is missing") from None
    return splits


def split_novel_ids(class_table: ClassTable, spec: SplitSpec) -> dict[str, list[int]]:
    """Novel class ids of every split, keyed by split name (split1, split2, ...)."""
    if spec.source == "paper":
        return _paper_splits(class_table, spec)
    return _random_splits(class_table.num_classes, spec)


def split_record(class_table: ClassTable, name: str, novel_ids: list[int]) -> dict:
    novel = sorted(set(novel_ids))
    if len(novel) != len(novel_ids) or not all(0 <= c < class_table.num_classes for c in novel):
        raise ValueError(f"{name}: novel ids must be distinct class ids of {class_table.dataset!r}")
    base = [c for c in range(class_table.num_classes) if c not in set(novel)]
    names = class_table.names
    return {
        "dataset": class_table.dataset,
        "name": name,
        "num_classes": class_table.num_classes,
        "novel_ratio": round(len(novel) / class_table.num_classes, 4),
        "base_ids": base,
        "novel_ids": novel,
        "base_names": [names[c] for c in base],
        "novel_names": [names[c] for c in novel],
    }


def write_split(classes: Path, spec: SplitSpec, name: str, out: Path) -> dict:
    class_table = ClassTable.load(classes)
    splits = split_novel_ids(class_table, spec)
    if name not in splits:
        raise KeyError(f"split {name!r} is not defined for {class_table.dataset!r} (defined: {', '.join(splits)})")
    record = split_record(class_table, name, splits[name])
    write_yaml(out, record)
    return record


def load_split(path: Path) -> dict:
    record = read_yaml(path)
    for key in ("name", "num_classes", "base_ids", "novel_ids"):
        if not isinstance(record, dict) or key not in record:
            raise ValueError(f"{path}: split file lacks the key {key!r}")
    return record


# --- image-level labels -------------------------------------------------------------------------------


def image_class_counts(label_png: Path, num_classes: int) -> np.ndarray:
    labels = np.asarray(Image.open(label_png))
    counts = np.bincount(labels.ravel(), minlength=256)
    if counts[num_classes:255].any():
        bad = int(np.flatnonzero(counts[num_classes:255])[0]) + num_classes
        raise ValueError(f"{label_png}: label value {bad} is neither a class id (< {num_classes}) nor 255")
    return counts[:num_classes]


def write_image_labels(prepared: Path, out: Path, *, min_pixels: int = 1) -> int:
    """Classes present (>= min_pixels pixels) in each training image of a prepared dataset, as a TSV."""
    prepared = Path(prepared)
    class_table = ClassTable.load(prepared / "classes.yaml")
    label_files = sorted((prepared / "labels" / "train").glob("*.png"))
    if not label_files:
        raise FileNotFoundError(f"{prepared / 'labels' / 'train'}: no label PNGs")
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        f.write("image\tclass_ids\n")
        for path in label_files:
            present = np.flatnonzero(image_class_counts(path, class_table.num_classes) >= min_pixels)
            f.write(f"{path.stem}\t{' '.join(str(c) for c in present)}\n")
    return len(label_files)


def read_image_labels(path: Path) -> dict[str, list[int]]:
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].split("\t")[:2] != ["image", "class_ids"]:
        raise ValueError(f"{path}: expected a TSV whose header starts with 'image<TAB>class_ids'")
    table = {}
    for number, line in enumerate(lines[1:], start=2):
        image, _, ids = line.partition("\t")
        try:
            table[image] = [int(c) for c in ids.split()]
        except ValueError:
            raise ValueError(f"{path}: line {number}: class ids must be integers") from None
    return table


def write_split_image_labels(image_labels: Path, split: Path, out: Path) -> None:
    """The image-level labels seen by a weak-shot method: present classes divided into base and novel."""
    record = load_split(split)
    novel = set(record["novel_ids"])
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        f.write("image\tbase_ids\tnovel_ids\n")
        for image, ids in read_image_labels(image_labels).items():
            base_ids = " ".join(str(c) for c in ids if c not in novel)
            novel_ids = " ".join(str(c) for c in ids if c in novel)
            f.write(f"{image}\t{base_ids}\t{novel_ids}\n")


def read_split_image_labels(path: Path) -> dict[str, tuple[list[int], list[int]]]:
    """image name -> (base ids, novel ids) present, from a ``{split}_image_labels.tsv``."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].split("\t") != ["image", "base_ids", "novel_ids"]:
        raise ValueError(f"{path}: expected the header 'image<TAB>base_ids<TAB>novel_ids'")
    table = {}
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}: line {number}: expected 3 tab-separated fields")
        try:
            table[parts[0]] = ([int(c) for c in parts[1].split()], [int(c) for c in parts[2].split()])
        except ValueError:
            raise ValueError(f"{path}: line {number}: class ids must be integers") from None
    return table
