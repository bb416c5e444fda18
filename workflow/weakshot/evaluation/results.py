"""COCO stuff-segmentation result files: the JSON that detectron2's ``SemSegEvaluator`` writes.

A result file is a JSON list with one entry per (image, predicted class)::

    [{"file_name": "000000000139.jpg", "category_id": 64,
      "segmentation": {"size": [H, W], "counts": "<COCO RLE string>"}}, ...]

``category_id`` is the *dataset* id of the class (``ClassTable.id_to_dataset_id``), not the contiguous train
id, so the file can be scored by the COCO stuff tools as well as by ours. Masks are encoded with
``pycocotools.mask`` from Fortran-order uint8 arrays, and the RLE bytes are decoded to str for JSON, exactly as
detectron2 does. Pixels whose predicted value is the ignore label (255) get no segment; reading a file back
fills every pixel no segment covers with 255, so a label map survives the round trip exactly.

Reading validates everything pycocotools' C decoder would trust blindly (it writes past its buffer when the
runs of a string add up to more than H*W) and decodes the runs itself, vectorised; the tests check the result
against ``pycocotools.mask.decode``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from weakshot.data.classes import IGNORE_LABEL
from weakshot.io_utils import atomic_path, write_text

Entry = dict[str, Any]


def encode_label_map(
    file_name: str, label_map: np.ndarray, id_to_dataset_id: Mapping[int, int], *, ignore_label: int = IGNORE_LABEL
) -> list[Entry]:
    """One result entry per class present in the ``(H, W)`` integer ``label_map`` (ignore pixels skipped)."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(
            f"encode_label_map({file_name!r}): expected a 2-D integer label map, "
            f"got shape {label_map.shape} dtype {label_map.dtype}"
        )
    entries: list[Entry] = []
    # Present values: a histogram is far cheaper than np.unique's sort for uint8 maps; fall back otherwise.
    if label_map.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(label_map.ravel(), minlength=256)).tolist()
    else:
        present = np.unique(label_map).tolist()
    for value in present:
        if value == ignore_label:
            continue
        if value not in id_to_dataset_id:
            raise ValueError(f"encode_label_map({file_name!r}): class id {value} is not in the class table")
        # pycocotools reads column-major (Fortran) uint8 arrays of shape (H, W, N).
        mask = np.asfortranarray(label_map == value, dtype=np.uint8)[:, :, None]
        rle = mask_util.encode(mask)[0]
        entries.append(
            {
                "file_name": file_name,
                "category_id": int(id_to_dataset_id[value]),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            }
        )
    return entries


def write_results(path: str | os.PathLike, entries: list[Entry]) -> None:
    """Write a result file atomically (one entry per line, so large files stay diffable and greppable)."""
    body = ",\n".join(json.dumps(e, separators=(",", ":")) for e in entries)
    write_text(path, f"[\n{body}\n]\n" if entries else "[]\n")


class ResultWriter:
    """Stream result entries into a file image by image; the file appears (atomically) only at ``close()``.

    Use it as a context manager: an exception inside the block discards the partial file::

        with ResultWriter(out, classes.id_to_dataset_id()) as writer:
            for name, pred in predictions:
                writer.add(name, pred)
    """

    def __init__(
        self, path: str | os.PathLike, id_to_dataset_id: Mapping[int, int], *, ignore_label: int = IGNORE_LABEL
    ) -> None:
        self.path = Path(path)
        self.id_to_dataset_id = dict(id_to_dataset_id)
        self.ignore_label = ignore_label
        self.num_entries = 0
        self._names: set[str] = set()
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(open(tmp, "w"))
        self._file.write("[")

    def add(self, file_name: str, label_map: np.ndarray) -> None:
        """Encode and append one image's prediction; an image may be added once."""
        if self._file.closed:
            raise RuntimeError(f"{self.path}: ResultWriter is already closed")
        if file_name in self._names:
            raise ValueError(f"{self.path}: image {file_name!r} was added twice")
        self._names.add(file_name)
        for entry in encode_label_map(file_name, label_map, self.id_to_dataset_id, ignore_label=self.ignore_label):
            self._file.write(",\n" if self.num_entries else "\n")
            self._file.write(json.dumps(entry, separators=(",", ":")))
            self.num_entries += 1

    def close(self) -> None:
        """Finish the JSON list and rename the file into place."""
        if self._file.closed:
            return
        self._file.write("\n]\n" if self.num_entries else "]\n")
        self._stack.close()

    def abort(self) -> None:
        """Drop the partial file; nothing appears at ``path``."""
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stack.__exit__(exc_type, exc, tb)


def _rle_run_lengths(counts: str) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (the inverse of pycocotools' ``rleToString``), vectorised.

    pycocotools' C decoder trusts the string and writes past its buffer when the runs add up to more than
    H*W, so every string is checked here before it is handed over. Each run is a little-endian group of
    6-bit characters (offset 48): 5 data bits plus a continuation bit, the top data bit of the last character
    sign-extends, and runs after the third are stored as differences to the run two places earlier.
    """
    chars = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("RLE counts hold characters outside the COCO alphabet")
    last = (chars & 0x20) == 0
    if not last[-1]:
        raise ValueError("RLE counts end in the middle of a run")
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    group = np.cumsum(np.concatenate([[0], last[:-1].astype(np.int64)]))
    shift = 5 * (np.arange(chars.size) - starts[group])
    if shift.max() > 50:
        raise ValueError("RLE counts hold a run too long to be real")
    runs = np.add.reduceat((chars & 0x1F) << shift, starts)
    lengths = np.diff(np.append(starts, chars.size))
    negative = (chars[last] & 0x10) != 0
    runs[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs[1::2] = np.cumsum(runs[1::2])  # run m (m >= 3) adds the run m - 2; run 1 and run 2 start the chains
    runs[2::2] = np.cumsum(runs[2::2])
    return runs


def _fail(path: Path, index: int, what: str) -> ValueError:
    return ValueError(f"{path}: entry {index}: {what}")


def load_result_entries(path: str | os.PathLike) -> dict[str, list[Entry]]:
    """Read and validate a result file; return its entries grouped by ``file_name`` (in file order)."""
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: result file not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a result file must be a JSON list of entries, got {type(data).__name__}")

    by_image: dict[str, list[Entry]] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise _fail(path, i, f"expected an object, got {type(entry).__name__}")
        missing = [key for key in ("file_name", "category_id", "segmentation") if key not in entry]
        if missing:
            raise _fail(path, i, f"missing key(s) {missing}")
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            raise _fail(path, i, "'file_name' must be a non-empty string")
        if not isinstance(entry["category_id"], int) or isinstance(entry["category_id"], bool):
            raise _fail(path, i, f"'category_id' must be an integer, got {entry['category_id']!r}")
        seg = entry["segmentation"]
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise _fail(path, i, "'segmentation' must be an object with 'size' and 'counts'")
        size = seg["size"]
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise _fail(path, i, f"'segmentation.size' must be [H, W] with positive integers, got {size!r}")
        if not isinstance(seg["counts"], str):
            raise _fail(path, i, "'segmentation.counts' must be a compressed RLE string")
        by_image.setdefault(entry["file_name"], []).append(entry)
    return by_image


def decode_image(
    path: str | os.PathLike,
    file_name: str,
    entries: list[Entry],
    dataset_id_to_id: Mapping[int, int],
    *,
    ignore_label: int = IGNORE_LABEL,
) -> np.ndarray:
    """Rebuild one image's uint8 ``(H, W)`` label map from its entries; uncovered pixels are ``ignore_label``.

    The runs are painted straight from the RLE strings instead of through one full-image mask per segment
    (pycocotools' ``decode``): each segment becomes a list of foreground intervals in column-major pixel
    order, all intervals are sorted once (which also exposes overlaps), and one ``np.repeat`` writes the map.
    The tests check this decoder against ``pycocotools.mask.decode``.
    """
    where = f"{path}: image {file_name!r}"
    size = entries[0]["segmentation"]["size"]
    height, width = size
    starts, ends, labels, categories = [], [], [], []
    for entry in entries:
        seg = entry["segmentation"]
        if seg["size"] != size:
            raise ValueError(f"{where}: segments disagree on the image size ({seg['size']} vs {size})")
        category = entry["category_id"]
        if category not in dataset_id_to_id:
            raise ValueError(f"{where}: category_id {category} is not a dataset id of the class table")
        try:
            runs = _rle_run_lengths(seg["counts"])
        except ValueError as err:
            raise ValueError(f"{where}, category_id {category}: {err}") from None
        if (runs.size and runs.min() < 0) or int(runs.sum()) != height * width:
            raise ValueError(f"{where}, category_id {category}: RLE counts do not cover the {height}x{width} mask")
        # Runs alternate background/foreground, starting with background; keep the non-empty foreground ones.
        run_ends = np.cumsum(runs)
        fg_end = run_ends[1::2]
        fg_len = runs[1::2]
        keep = fg_len > 0
        starts.append(fg_end[keep] - fg_len[keep])
        ends.append(fg_end[keep])
        labels.append(np.full(int(keep.sum()), dataset_id_to_id[category], dtype=np.int64))
        categories.append(np.full(int(keep.sum()), category, dtype=np.int64))

    start, end = np.concatenate(starts), np.concatenate(ends)
    label, category_of = np.concatenate(labels), np.concatenate(categories)
    order = np.argsort(start, kind="stable")
    start, end, label, category_of = start[order], end[order], label[order], category_of[order]
    clash = np.flatnonzero(start[1:] < end[:-1])
    if clash.size:
        i = int(clash[0])
        a, b = sorted({int(category_of[i]), int(category_of[i + 1])})
        raise ValueError(f"{where}: the segments of category_id {a} and {b} overlap")

    # Interleave [gap before interval i, interval i] and a final gap, then expand them in one go.
    gap = start - np.concatenate([[0], end[:-1]])
    values = np.empty(2 * label.size + 1, dtype=np.uint8)
    values[0:-1:2], values[1::2], values[-1] = ignore_label, label, ignore_label
    lengths = np.empty(2 * label.size + 1, dtype=np.int64)
    lengths[0:-1:2], lengths[1::2] = gap, end - start
    lengths[-1] = height * width - (int(end[-1]) if end.size else 0)
    column_major = np.repeat(values, lengths)
    return np.ascontiguousarray(column_major.reshape(width, height).T)


def iter_results(
    path: str | os.PathLike, dataset_id_to_id: Mapping[int, int], *, ignore_label: int = IGNORE_LABEL
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(file_name, label_map)`` per image, decoding lazily so only one map is in memory at a time."""
    for file_name, entries in load_result_entries(path).items():
        yield file_name, decode_image(path, file_name, entries, dataset_id_to_id, ignore_label=ignore_label)


def read_results(
    path: str | os.PathLike, dataset_id_to_id: Mapping[int, int], *, ignore_label: int = IGNORE_LABEL
) -> dict[str, np.ndarray]:
    """All images of a result file as ``{file_name: uint8 label map}`` (uncovered pixels = ``ignore_label``)."""
    return dict(iter_results(path, dataset_id_to_id, ignore_label=ignore_label))
