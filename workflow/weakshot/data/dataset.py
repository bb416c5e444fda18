"""Prepared-dataset reading, the weak-shot training mapper, pair items, batching and the training/test loaders.

Layers, each one concept:

* ``SegmentationDataset``: names and raw arrays of one split of a prepared dataset (``images/<split>``,
  ``labels/<split>``), optionally with pseudo-labels from another folder.
* ``WeakShotMapper``: augmentation (``weakshot.data.transforms``) plus the per-image targets of SimFormer's
  weak-shot mapper (method reference 3.1): mask targets for base classes, mask-less targets (image-level labels)
  for novel classes.
* ``WeakShotDataset`` / ``PairDataset``: torch datasets of mapped samples, single or (input, reference).
* ``TestDataset``: test-resized, padded images with the sizes needed to map predictions back.
* ``collate``: samples -> the batch dict of the shared contract.
* ``infinite_loader``: the training stream; resumable at any iteration.

Determinism. A training item is addressed by the key ``(epoch, index)``; its augmentation generator is
``np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))``. The key travels with the request to the
worker, so a sample does not depend on which worker loads it, how many workers there are, or on worker state
(``set_epoch`` is only needed when a plain integer index is used). The epoch's order is a ``torch.randperm`` from a
generator seeded by ``(seed, epoch)`` alone, so the stream of keys at iteration n can be computed without
replaying iterations 0..n-1.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from weakshot.config import AugmentConfig
from weakshot.data.transforms import IGNORE_LABEL, PAD_IMAGE_VALUE, resize_for_test, test_sizes, train_augment

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_LISTED = 5  # how many offending names an error or warning spells out
# Decoded (image, label) pairs kept in memory, per process (each DataLoader worker and DDP rank has its own).
# Decoding a PNG/JPEG is most of the data time of a small-image step (the embedded default: 1.4 of 1.8 ms an
# image; its whole train split is 8 MB decoded). At paper scale the budget holds a few dozen images and the rest
# are decoded on every load, so it is kept small: 8 ranks x 4 workers (the paper configs) stay within 2 GiB.
DEFAULT_CACHE_BYTES = 64 * 2**20
SPLITS = ("train", "test")

Key = int | tuple[int, int]  # a plain index, or (epoch, index)


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def read_image(path: Path) -> np.ndarray:
    """H x W x 3 RGB uint8. EXIF orientation is not applied: the label PNGs index the stored pixel grid."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_label(path: Path) -> np.ndarray:
    """H x W uint8 label map (contiguous class ids, 255 = ignore)."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"{path}: a label PNG must be single-channel (mode L or P), not mode {image.mode}")
        return np.asarray(image, dtype=np.uint8)


# --- raw split ------------------------------------------------------------------------------------------


class SegmentationDataset:
    """One split of a prepared dataset: sorted image names, and (image, label) arrays by index.

    ``labels_dir`` replaces ``labels/<split>`` by a folder of ``<name>.png`` pseudo-labels (retraining). An
    image without a pseudo-label falls back to its ground-truth label, as SimFormer's retraining loader does;
    the fallbacks are listed in ``pseudo_fallbacks`` and logged once, here, rather than per load in workers.
    Loaded pairs are kept, read-only, until they fill ``cache_bytes`` (0: no cache).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        labels_dir: str | Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        self.root = Path(root)
        self.split = split
        image_dir = self.root / "images" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{image_dir}: no such image folder (is {self.root} a prepared dataset?)")
        self.image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.image_paths:
            raise FileNotFoundError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        self.names = [p.stem for p in self.image_paths]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{image_dir}: two images share a name (differing only in the suffix)")
        self._index = {name: i for i, name in enumerate(self.names)}

        gt_dir = self.root / "labels" / split
        gt_names = {p.stem for p in gt_dir.glob("*.png")} if gt_dir.is_dir() else set()
        missing = [n for n in self.names if n not in gt_names]
        if missing:
            raise FileNotFoundError(f"{gt_dir}: no label PNG for {_listing(missing)}")
        self.label_paths = [gt_dir / f"{n}.png" for n in self.names]

        self.labels_dir = None if labels_dir is None else Path(labels_dir)
        self.pseudo_fallbacks: list[str] = []
        if self.labels_dir is not None:
            if not self.labels_dir.is_dir():
                raise FileNotFoundError(f"{self.labels_dir}: no such pseudo-label folder")
            pseudo = {p.stem for p in self.labels_dir.glob("*.png")}
            self.pseudo_fallbacks = [n for n in self.names if n not in pseudo]
            self.label_paths = [
                self.labels_dir / f"{name}.png" if name in pseudo else path
                for name, path in zip(self.names, self.label_paths)
            ]
            if self.pseudo_fallbacks:
                log.warning(
                    "%s: %d of %d images have no pseudo-label and use their ground truth: %s",
                    self.labels_dir,
                    len(self.pseudo_fallbacks),
                    len(self.names),
                    _listing(self.pseudo_fallbacks),
                )
        self.cache_bytes = cache_bytes
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.names)

    def index_of(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{name!r} is not an image of {self.root / 'images' / self.split}") from None

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image H x W x 3 uint8 RGB, label H x W uint8), read-only."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{label_path}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from image "
                f"{image_path} size {image.shape[1]}x{image.shape[0]}"
            )
        image.flags.writeable = False
        label.flags.writeable = False
        size = image.nbytes + label.nbytes
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[index] = (image, label)
            self._cached_bytes += size
        return image, label


# --- weak-shot targets ----------------------------------------------------------------------------------


class WeakShotMapper:
    """Augment one (image, label) and build its targets.

    ``mode="weak"``: for each class present in the *augmented crop* (read from the full GT, as SimFormer
    does: the image-level label of a novel class is "it survived the crop"), a base class gets its binary
    mask, a novel class gets an all-False mask with ``has_mask`` False. Base targets come first. The returned
    label map has the novel pixels set to 255, so the method never sees novel pixels.

    ``mode="base"`` (base-model pretraining): as "weak", but novel classes get no target at all: the model
    learns the base classes only and never hears of the novel ones.

    ``mode="full"`` (oracle, retraining on pseudo-labels): every present class is a mask target and the label
    map is unchanged. ``novel_ids`` is still reported in the batch (empty for the oracle: pass None).
    """

    def __init__(self, aug: AugmentConfig, novel_ids: Sequence[int] | None, mode: str = "weak", seed: int = 0) -> None:
        if mode not in ("weak", "base", "full"):
            raise ValueError(f"mapper mode must be 'weak', 'base' or 'full', not {mode!r}")
        novel = sorted({int(c) for c in (novel_ids or [])})
        if any(not 0 <= c < IGNORE_LABEL for c in novel):
            raise ValueError(f"novel ids must lie in 0..{IGNORE_LABEL - 1}: {novel}")
        if mode in ("weak", "base") and not novel:
            raise ValueError(f"{mode} mode needs the split's novel ids (use mode='full' for the oracle)")
        self.aug = aug
        self.mode = mode
        self.seed = int(seed)
        self.novel_ids = novel
        self._is_novel = np.zeros(256, dtype=bool)
        self._is_novel[novel] = True
        # Label lookup table of what the method may see: novel -> 255 in weak mode, identity in full mode.
        self._visible = np.arange(256, dtype=np.uint8)
        if mode in ("weak", "base"):
            self._visible[self._is_novel] = IGNORE_LABEL

    def sequence(self, epoch: int, index: int) -> np.random.SeedSequence:
        """The seed sequence of item (epoch, index); its children seed pair references (``PairDataset``)."""
        return np.random.SeedSequence([self.seed, int(epoch), int(index)])

    def generator(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng(self.sequence(epoch, index))

    def targets(self, label: np.ndarray) -> dict[str, torch.Tensor]:
        """Targets of a (padded, augmented, *full-GT*) label map: base/mask targets first, then mask-less ones."""
        counts = np.bincount(label.ravel(), minlength=256)
        counts[IGNORE_LABEL] = 0
        present = np.flatnonzero(counts)
        if self.mode == "weak":
            with_mask = present[~self._is_novel[present]]
            without_mask = present[self._is_novel[present]]
        elif self.mode == "base":
            with_mask, without_mask = present[~self._is_novel[present]], present[:0]
        else:
            with_mask, without_mask = present, present[:0]
        ids = torch.from_numpy(np.concatenate([with_mask, without_mask]).astype(np.int64))
        masks = torch.zeros((len(ids), *label.shape), dtype=torch.bool)
        # Compare in uint8 (int64 ids would widen the whole label map) straight into the output: no copy.
        base_ids = torch.from_numpy(with_mask.astype(np.uint8))[:, None, None]
        torch.eq(torch.from_numpy(label)[None], base_ids, out=masks[: len(with_mask)])
        has_mask = torch.arange(len(ids)) < len(with_mask)
        return {"labels": ids, "masks": masks, "has_mask": has_mask}

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator, name: str = "") -> dict:
        """One training sample: ``image`` uint8 3xHxW, ``labels`` uint8 HxW (visible labels), ``pad_mask``,
        ``targets``, ``novel_ids``, ``name``. ``collate`` turns these into the contract's batch dtypes."""
        image, label, pad_mask = train_augment(image, label, self.aug, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "labels": torch.from_numpy(self._visible[label]),
            "pad_mask": torch.from_numpy(pad_mask),
            "targets": self.targets(label),
            "novel_ids": torch.tensor(self.novel_ids, dtype=torch.int64),
            "name": name,
        }


# --- torch datasets -------------------------------------------------------------------------------------


class WeakShotDataset(Dataset):
    """Mapped training samples. ``dataset[(epoch, index)]`` or, with ``set_epoch``, ``dataset[index]``."""

    def __init__(self, source: SegmentationDataset, mapper: WeakShotMapper) -> None:
        self.source = source
        self.mapper = mapper
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def names(self) -> list[str]:
        return self.source.names

    def key(self, key: Key) -> tuple[int, int]:
        if isinstance(key, tuple):
            epoch, index = key
        else:
            epoch, index = self.epoch, key
        if not 0 <= int(index) < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return int(epoch), int(index)

    def load(self, index: int, rng: np.random.Generator) -> dict:
        image, label = self.source.load(index)
        return self.mapper(image, label, rng, self.source.names[index])

    def __getitem__(self, key: Key) -> dict:
        epoch, index = self.key(key)
        return self.load(index, self.mapper.generator(epoch, index))


class ReferenceChooser(Protocol):
    """What ``PairDataset`` needs of ``weakshot.data.pairs.ReferenceSampler``."""

    def sample(self, name: str, rng: random.Random) -> str: ...


class PairDataset(Dataset):
    """Items for pixel-pixel similarity transfer.

    ``pairing="cross"``: ``(input, reference)``, the reference named by ``sampler.sample(name, rng)``; both are
    fully augmented samples. ``pairing="self"``: ``(input,)``, paired with itself by ``collate``.
    The input's augmentation equals the unpaired ``WeakShotDataset`` item of the same key; the reference's
    augmentation and the sampler's ``random.Random`` come from children of the item's seed sequence.
    """

    def __init__(self, base: WeakShotDataset, sampler: ReferenceChooser | None, pairing: str = "cross") -> None:
        if pairing not in ("cross", "self"):
            raise ValueError(f"pairing must be 'cross' or 'self', not {pairing!r}")
        if pairing == "cross" and sampler is None:
            raise ValueError("cross pairing needs a reference sampler")
        self.base = base
        self.sampler = sampler
        self.pairing = pairing

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __getitem__(self, key: Key) -> tuple[dict, ...]:
        epoch, index = self.base.key(key)
        sequence = self.base.mapper.sequence(epoch, index)
        item = self.base.load(index, np.random.default_rng(sequence))
        if self.pairing == "self":
            return (item,)
        reference_seq, choice_seq = sequence.spawn(2)
        choice_rng = random.Random(int(choice_seq.generate_state(1, np.uint64)[0]))
        reference_name = self.sampler.sample(self.base.names[index], choice_rng)
        reference_index = self.base.source.index_of(reference_name)
        return item, self.base.load(reference_index, np.random.default_rng(reference_seq))


class TestDataset(Dataset):
    """Test-resized images (shortest edge ``test_size``, padded to a multiple of 32) of one split.

    Items: ``image`` uint8 3xHxW, ``pad_mask``, ``name``, ``orig_size`` (H0, W0) and ``image_size`` (h, w), the
    resized size before padding: a prediction is cropped to ``[:h, :w]`` and resized to ``orig_size``.
    Labels are not loaded (evaluation reads the original PNGs at the original resolution).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, root: str | Path, split: str | None = "test", test_size: int = 640, max_size: int | None = None
    ) -> None:
        # split=None: ``root`` is itself the image folder (a user's images for the inference CLI).
        image_dir = Path(root) / "images" / split if split is not None else Path(root)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{image_dir}: no such image folder")
        self.image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.image_paths:
            raise FileNotFoundError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        self.names = [p.stem for p in self.image_paths]
        self.test_size = test_size
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.image_paths)

    def padded_size(self, index: int) -> tuple[int, int]:
        """(H, W) of item ``index``'s image tensor, from the image file's header (no pixels decoded)."""
        with Image.open(self.image_paths[index]) as image:
            width, height = image.size
        return test_sizes(height, width, self.test_size, self.max_size)[1]

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.image_paths[index])
        padded, pad_mask, size = resize_for_test(image, self.test_size, self.max_size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))),
            "pad_mask": torch.from_numpy(pad_mask),
            "name": self.names[index],
            "orig_size": (int(image.shape[0]), int(image.shape[1])),
            "image_size": (int(size[0]), int(size[1])),
        }


# --- batching -------------------------------------------------------------------------------------------


def _pad_to(tensor: torch.Tensor, height: int, width: int, value: Any) -> torch.Tensor:
    """Pad a ``...xHxW`` tensor bottom/right to height x width with ``value`` (returned as is when it fits)."""
    if tensor.shape[-2:] == (height, width):
        return tensor
    out = torch.full((*tensor.shape[:-2], height, width), value, dtype=tensor.dtype)
    out[..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
    return out


def _pad_stack(tensors: list[torch.Tensor], height: int, width: int, value: Any) -> torch.Tensor:
    return torch.stack([_pad_to(t, height, width, value) for t in tensors])


def collate(items: Sequence[dict | tuple[dict, ...]]) -> dict[str, Any]:
    """Samples -> batch dict (shared contract).

    Paired items (tuples) are flattened as [input0, ref0, input1, ref1, ...] and ``pairs`` lists the batch
    indices (input, reference); a self item ``(input,)`` gives the pair (b, b). Images of different sizes (test
    batches > 1) are padded to the largest, with the same pad values as the mapper.
    """
    if not items:
        raise ValueError("collate: empty batch")
    pairs = None
    if isinstance(items[0], tuple):
        samples, pair_list = [], []
        for item in items:
            start = len(samples)
            samples.extend(item)
            pair_list.append((start, start + len(item) - 1))
        pairs = torch.tensor(pair_list, dtype=torch.int64)
    else:
        samples = list(items)

    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)
    batch: dict[str, Any] = {
        "images": _pad_stack([s["image"] for s in samples], height, width, PAD_IMAGE_VALUE).float(),
        "pad_mask": _pad_stack([s["pad_mask"] for s in samples], height, width, True),
        "names": [s["name"] for s in samples],
    }
    if "labels" in samples[0]:
        batch["labels"] = _pad_stack([s["labels"] for s in samples], height, width, IGNORE_LABEL).long()
        batch["targets"] = [
            {**s["targets"], "masks": _pad_to(s["targets"]["masks"], height, width, False)} for s in samples
        ]
        batch["novel_ids"] = samples[0]["novel_ids"]
    if "orig_size" in samples[0]:
        batch["orig_size"] = [s["orig_size"] for s in samples]
        batch["image_size"] = [s["image_size"] for s in samples]
    if pairs is not None:
        batch["pairs"] = pairs
    return batch


# --- loaders --------------------------------------------------------------------------------------------

_SHUFFLE_STREAM = 1  # spawn key that keeps epoch orders apart from the per-item augmentation streams


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled index order of one epoch; depends only on (seed, epoch)."""
    state = np.random.SeedSequence([seed, epoch], spawn_key=(_SHUFFLE_STREAM,)).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.randperm(num_items, generator=generator)


class InfiniteBatchSampler:
    """Batches of keys ``(epoch, index)`` cut from the endless concatenation of per-epoch permutations.

    Batch i holds positions ``i*B .. i*B + B - 1`` of that stream (a batch may straddle two epochs), so
    starting at iteration n means starting at position n*B: whole epochs are skipped arithmetically and the
    current epoch's order is entered at its offset, without loading any image.

    In a multi-process job ``batch_size`` is the global batch and rank r takes its r-th contiguous share, so
    the ranks together see exactly the batch one process would.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start_iteration: int = 0,
        dataset: Any = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_items < 1 or batch_size < 1 or start_iteration < 0:
            raise ValueError("need num_items >= 1, batch_size >= 1 and start_iteration >= 0")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"batch {batch_size} cannot be shared by rank {rank} of {world_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start_iteration = start_iteration
        self.share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.dataset = dataset  # told the epoch (set_epoch) for main-process bookkeeping; keys carry it anyway

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start_iteration * self.batch_size, self.num_items)
        batch: list[tuple[int, int]] = []
        while True:
            if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            for index in epoch_order(self.num_items, self.seed, epoch)[offset:].tolist():
                batch.append((epoch, index))
                if len(batch) == self.batch_size:
                    yield batch[self.share]
                    batch = []
            epoch, offset = epoch + 1, 0


def infinite_loader(
    dataset: WeakShotDataset | PairDataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
    start_iteration: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """Training batches forever, from iteration ``start_iteration`` on (batch_size items per batch).

    The batch of iteration n is the same whether the stream started at 0 or was resumed at any m <= n, and
    whatever ``num_workers`` is. For a ``PairDataset`` a batch holds ``batch_size`` pairs (2x images for cross):
    a pair is one item, so it always stays on one rank. With ``world_size`` > 1, ``batch_size`` is the global
    batch and this rank gets its ``batch_size / world_size`` share.
    """
    sampler = InfiniteBatchSampler(len(dataset), batch_size, seed, start_iteration, dataset, rank, world_size)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        # Its own generator: starting the loader must not draw from the global torch RNG, whose state a
        # resumed run restores from the checkpoint (else a resumed run would drift from an uninterrupted one).
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )
    yield from loader


# Images per evaluation batch. At batch 1 the embedded model's forward pass is mostly per-operator overhead
# (a 32 px image), and prediction was a tenth of the Tables 1-2 run; batches of this size cut it to a few
# percent. In inference mode a batch of 16 holds less than a training batch of 8 does (no activations are kept
# for a backward pass), at paper scale too.
EVAL_BATCH_SIZE = 16


class SameSizeBatches(Sampler[list[int]]):
    """Consecutive indices (name order) in batches of at most ``batch_size`` images of the same padded size.

    The network then sees every image exactly as at batch 1, with no padding beyond its own: padding a smaller
    image up to a larger one would change its convolutions at the border and what its queries attend to.
    Consecutive only, so that outputs still come in name order; a dataset of one size (the embedded one, or
    any resized to a fixed size) gets full batches, a real one as many as its runs of equal sizes allow.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.batches: list[list[int]] = []
        for index, size in enumerate(sizes):
            last = self.batches[-1] if self.batches else None
            if last is not None and len(last) < batch_size and sizes[last[0]] == size:
                last.append(index)
            else:
                self.batches.append([index])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def evaluation_loader(
    dataset: TestDataset, num_workers: int = 0, pin_memory: bool = False, batch_size: int = EVAL_BATCH_SIZE
) -> DataLoader:
    """Batches of test-resized images of one padded size, in name order (for evaluation and pseudo-labelling)."""
    sizes = [dataset.padded_size(i) for i in range(len(dataset))]
    return DataLoader(
        dataset,
        batch_sampler=SameSizeBatches(sizes, batch_size),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
    )
