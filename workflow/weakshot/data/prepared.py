"""The prepared dataset layout, shared by the COCO-Stuff-10K and ADE20K converters.

A prepared dataset is one folder::

    images/{train,test}/<name>.jpg     hard links to (or copies of) the archive's images
    labels/{train,test}/<name>.png     uint8 mode-L PNGs: contiguous class ids, 255 = ignore
    classes.yaml                       the class table the ids refer to
    summary.yaml                       counts per split, label formats seen, excluded images

The converters only differ in how they find samples and decode a label file; everything else
(checks, exclusion, writing, parallelism, atomicity) lives here so both behave identically.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from weakshot.data.classes import ClassTable
from weakshot.io_utils import atomic_dir, write_yaml

SPLITS = ("train", "test")
MAX_WORKERS = 8  # conversion is I/O- and decode-bound; more processes mostly add contention
POOL_MIN_SAMPLES = 500  # below this, starting worker processes (~0.5 s of imports each) costs more than it saves
INVALID = -1  # marks a raw id that must not occur in a lookup table (see map_ids)
MAX_LISTED = 5  # how many offending names an error message spells out

# Decodes one annotation file into (label map of contiguous ids / 255, format tag such as "v1.1").
LabelReader = Callable[[Path], tuple[np.ndarray, str]]


@dataclass(frozen=True)
class Sample:
    """One image/annotation pair of the raw archive and the split it goes to."""

    split: str
    name: str
    image: Path
    annotation: Path


@dataclass(frozen=True)
class SampleResult:
    split: str
    name: str
    label_format: str
    all_ignore: bool


def say(message: str) -> None:
    """Status line on stderr (the CLI sets up no logging; Snakemake keeps stderr in the rule log)."""
    print(f"[weakshot] {message}", file=sys.stderr, flush=True)


def _preview(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def find_root(raw: Path, is_root: Callable[[Path], bool], what: str, max_depth: int = 3) -> Path:
    """The single folder under ``raw`` (itself included, breadth first) for which ``is_root`` holds.

    Archives differ in whether they wrap everything in a top folder, so the converters look for
    their marker folders instead of assuming a fixed depth.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: extracted archive folder not found")
    level = [raw]
    for _ in range(max_depth + 1):
        found = [folder for folder in level if is_root(folder)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{raw}: several folders look like {what}: {_preview(str(f) for f in found)}")
        # Hidden folders and macOS resource forks (__MACOSX) never hold the dataset.
        level = sorted(
            child
            for folder in level
            for child in folder.iterdir()
            if child.is_dir() and not child.name.startswith((".", "__MACOSX"))
        )
    raise FileNotFoundError(f"{raw}: no {what} found (searched {max_depth} folder levels deep)")


def lookup_table(class_table: ClassTable, *, unknown: int) -> np.ndarray:
    """raw id (0..255) -> contiguous id; raw ids the table does not name map to ``unknown``.

    ``unknown`` is the ignore label where unnamed ids are legitimate (COCO's unused ids) or INVALID
    where they mean the archive and the class table disagree.
    """
    lut = np.full(256, unknown, dtype=np.int16)
    for dataset_id, train_id in class_table.dataset_id_to_id().items():
        if not 0 <= dataset_id <= 255:
            raise ValueError(f"class table of {class_table.dataset!r}: dataset_id {dataset_id} outside 0..255")
        lut[dataset_id] = train_id
    return lut


def map_ids(raw: np.ndarray, lut: np.ndarray, path: Path) -> np.ndarray:
    """Map a raw 2-D id array through ``lut`` (vectorised); INVALID entries or ids > 255 are errors.

    Raw ids beyond the table are errors too: every dataset here stores ids below 256, so a larger
    value means a misread file rather than an unused class.
    """
    if raw.ndim != 2:
        raise ValueError(f"{path}: label map has shape {raw.shape}, expected a 2-D (H, W) array")
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw) & (raw == np.round(raw))):
        raise ValueError(f"{path}: label map holds non-integer values")
    if raw.dtype.kind not in "uif" and raw.dtype != np.bool_:
        raise ValueError(f"{path}: label map has non-numeric dtype {raw.dtype}")
    ids = raw.astype(np.int64)
    out_of_range = (ids < 0) | (ids >= lut.shape[0])
    mapped = lut[np.clip(ids, 0, lut.shape[0] - 1)]
    bad = out_of_range | (mapped == INVALID)
    if bad.any():
        values = sorted({int(v) for v in np.unique(ids[bad])})
        raise ValueError(
            f"{path}: raw label values {values[:MAX_LISTED]} are not known ids of this dataset; "
            "does the class table match the archive?"
        )
    return mapped.astype(np.uint8)


def check_samples(samples: Sequence[Sample]) -> None:
    """Fail before converting anything when a listed file is missing or a name is listed twice."""
    missing = [str(p) for s in samples for p in (s.image, s.annotation) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed files are missing: {_preview(missing)}")
    seen: dict[str, str] = {}
    for sample in samples:
        if sample.name in seen:
            where = sample.split if seen[sample.name] == sample.split else f"{seen[sample.name]} and {sample.split}"
            raise ValueError(f"image {sample.name!r} is listed twice ({where})")
        seen[sample.name] = sample.split


def apply_exclusion(samples: Sequence[Sample], exclude_train: Sequence[str]) -> tuple[list[Sample], dict[str, Any]]:
    """Drop excluded names from train (never from test) and report what was and was not found."""
    excluded = set(exclude_train)
    kept = [s for s in samples if not (s.split == "train" and s.name in excluded)]
    skipped = sorted(s.name for s in samples if s.split == "train" and s.name in excluded)
    not_found = sorted(excluded - set(skipped))
    if not_found:
        say(f"{len(not_found)} names to exclude are not in the train list: {_preview(not_found)}")
    report = {"requested": len(excluded), "skipped": len(skipped), "names": skipped, "not_in_train_list": not_found}
    return kept, report


def _place_image(src: Path, dst: Path) -> None:
    """Hard link (no extra disk for 10-20k JPEGs) and fall back to a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def convert_sample(sample: Sample, read_label: LabelReader, out: Path, ignore_label: int) -> SampleResult:
    """Decode, check and write one label PNG, and place its image. Runs in worker processes."""
    label, label_format = read_label(sample.annotation)
    try:
        with Image.open(sample.image) as image:
            width, height = image.size  # reads the header only
    except OSError as err:
        raise ValueError(f"{sample.image}: cannot read image ({err})") from None
    if label.shape != (height, width):
        raise ValueError(
            f"{sample.annotation}: label shape {label.shape} (H, W) differs from image {sample.image.name} "
            f"({height}, {width})"
        )
    label = np.ascontiguousarray(label, dtype=np.uint8)
    Image.fromarray(label).save(out / "labels" / sample.split / f"{sample.name}.png")
    _place_image(sample.image, out / "images" / sample.split / f"{sample.name}{sample.image.suffix.lower()}")
    return SampleResult(sample.split, sample.name, label_format, bool(np.all(label == ignore_label)))


def default_workers() -> int:
    """CPUs this process may use (respects SLURM/cgroup CPU sets), capped at MAX_WORKERS."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, available))


def _run(samples: Sequence[Sample], work: Callable[[Sample], SampleResult], workers: int) -> list[SampleResult]:
    """Map ``work`` over the samples, in-process for one worker, else in a process pool.

    ProcessPoolExecutor rather than multiprocessing.Pool: when a worker dies (killed for memory) it
    raises BrokenProcessPool instead of hanging. "spawn" rather than fork: the caller may hold threads
    (an HTTP server in tests, torch's pools) that a forked child would inherit in a broken state.
    """
    results: list[SampleResult] = []
    step = max(1, len(samples) // 10)
    executor: ProcessPoolExecutor | None = None
    if workers <= 1 or len(samples) < max(2 * workers, POOL_MIN_SAMPLES):
        iterator: Iterable[SampleResult] = map(work, samples)
    else:
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        iterator = executor.map(work, samples, chunksize=16)
    try:
        for i, result in enumerate(iterator, start=1):
            results.append(result)
            if i % step == 0 or i == len(samples):
                say(f"converted {i}/{len(samples)} samples")
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return results


def write_prepared(
    out: Path,
    samples: Sequence[Sample],
    read_label: LabelReader,
    class_table: ClassTable,
    *,
    exclude_train: Sequence[str] = (),
    source: Path,
    extra_summary: dict[str, Any] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Check, convert and write ``samples`` into ``out`` atomically; return the summary it wrote.

    ``read_label`` must be picklable (a module-level function or a functools.partial of one) when
    more than one worker is used.
    """
    check_samples(samples)
    samples, excluded = apply_exclusion(samples, exclude_train)
    workers = default_workers() if workers is None else max(1, int(workers))
    with atomic_dir(out) as tmp:
        for kind in ("images", "labels"):
            for split in SPLITS:
                (tmp / kind / split).mkdir(parents=True, exist_ok=True)
        work = functools.partial(convert_sample, read_label=read_label, out=tmp, ignore_label=class_table.ignore_label)
        results = _run(samples, work, workers)
        summary = _summary(results, class_table, excluded, source, extra_summary or {})
        class_table.save(tmp / "classes.yaml")
        write_yaml(tmp / "summary.yaml", summary)
    say(f"wrote {out}: " + ", ".join(f"{split} {summary['counts'][split]}" for split in SPLITS))
    return summary


def _summary(
    results: Sequence[SampleResult],
    class_table: ClassTable,
    excluded: dict[str, Any],
    source: Path,
    extra: dict[str, Any],
) -> dict[str, Any]:
    counts = Counter(r.split for r in results)
    formats = Counter(r.label_format for r in results)
    all_ignore = sorted(r.name for r in results if r.split == "train" and r.all_ignore)
    summary: dict[str, Any] = {
        "dataset": class_table.dataset,
        "source": str(source),
        "num_classes": class_table.num_classes,
        "ignore_label": class_table.ignore_label,
        "counts": {split: counts.get(split, 0) for split in SPLITS},
        "label_formats": dict(sorted(formats.items())),
        "excluded_train": excluded,
        # Training images whose label is entirely ignore (SimFormer skips such ADE images).
        "train_all_ignore": all_ignore,
    }
    summary.update(extra)
    return summary
