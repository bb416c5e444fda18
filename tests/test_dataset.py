"""Data loading, transforms and the weak-shot mapper, on a tiny prepared dataset built in tmp_path."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakshot.config import AugmentConfig
from weakshot.data import transforms as T
from weakshot.data.classes import ClassInfo, ClassTable
from weakshot.data.dataset import (
    PairDataset,
    SameSizeBatches,
    SegmentationDataset,
    TestDataset,
    WeakShotDataset,
    WeakShotMapper,
    collate,
    evaluation_loader,
    infinite_loader,
)

K = 6
NOVEL = [4, 5]
AUG = AugmentConfig(crop_size=32, min_scale=0.75, max_scale=1.5, test_size=32, crop_retries=50)
# (height, width) of the training images; all larger than the crop so crops move between epochs.
TRAIN_SIZES = [(48, 64), (64, 40), (40, 56), (56, 56), (44, 72)]


def _label_map(height: int, width: int, seed: int) -> np.ndarray:
    """Vertical bands of every class (so each crop sees several), an unlabelled block (255)."""
    rng = np.random.default_rng(seed)
    columns = np.repeat(rng.permutation(K), -(-width // K))[:width]
    label = np.broadcast_to(columns, (height, width)).astype(np.uint8).copy()
    label[: height // 4, : width // 4] = 255
    label[height // 2 :, :] = (label[height // 2 :, :] + 1) % K  # second row of bands, shifted ids
    return label


def _image_for(label: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    return palette[label]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    root = tmp_path / "prepared"
    ClassTable("toy", tuple(ClassInfo(i, f"c{i}", i + 1) for i in range(K))).save(root / "classes.yaml")
    sizes = {"train": TRAIN_SIZES, "test": [(48, 64), (30, 90)]}
    for split, shapes in sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            label = _label_map(h, w, seed=i)
            Image.fromarray(_image_for(label, i)).save(root / "images" / split / f"{split}_{i}.jpg", quality=95)
            Image.fromarray(label).save(root / "labels" / split / f"{split}_{i}.png")
    return root


def _dataset(root: Path, mode: str = "weak", seed: int = 3, aug: AugmentConfig = AUG, **kw) -> WeakShotDataset:
    novel = NOVEL if mode in ("weak", "base") else None
    return WeakShotDataset(SegmentationDataset(root, "train", **kw), WeakShotMapper(aug, novel, mode, seed))


class FakeSampler:
    """Stands in for weakshot.data.pairs.ReferenceSampler: the next image in name order."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def sample(self, name: str, rng: random.Random) -> str:
        assert isinstance(rng, random.Random)
        return self.names[(self.names.index(name) + 1) % len(self.names)]


# --- weak-shot targets ----------------------------------------------------------------------------------


def test_weak_mode_hides_novel_pixels_and_lists_base_targets_first(prepared: Path) -> None:
    weak, full = _dataset(prepared, "weak"), _dataset(prepared, "full")
    seen_novel = 0
    for index in range(len(weak)):
        for epoch in range(3):
            w, f = weak[(epoch, index)], full[(epoch, index)]
            gt = f["labels"]  # same seed and key -> same augmentation; full mode keeps the labels
            assert torch.equal(w["image"], f["image"])
            assert not torch.isin(w["labels"], torch.tensor(NOVEL, dtype=torch.uint8)).any()
            expected_visible = gt.clone()
            expected_visible[torch.isin(gt, torch.tensor(NOVEL, dtype=torch.uint8))] = 255
            assert torch.equal(w["labels"], expected_visible)

            t = w["targets"]
            present = sorted(set(torch.unique(gt).tolist()) - {255})
            assert sorted(t["labels"].tolist()) == present  # image-level labels = classes surviving the crop
            is_novel = torch.isin(t["labels"], torch.tensor(NOVEL))
            assert torch.equal(t["has_mask"], ~is_novel)
            n_base = int((~is_novel).sum())
            assert not is_novel[:n_base].any() and is_novel[n_base:].all()  # base first
            for c, mask, has in zip(t["labels"].tolist(), t["masks"], t["has_mask"].tolist()):
                if has:
                    assert torch.equal(mask, gt == c) and mask.any()
                else:
                    assert not mask.any()
            seen_novel += int(is_novel.sum())
            assert t["masks"].shape == (len(present), 32, 32) and t["masks"].dtype == torch.bool
            assert torch.equal(w["novel_ids"], torch.tensor(NOVEL))

            ft = f["targets"]
            assert ft["labels"].tolist() == present and bool(ft["has_mask"].all())
            assert all(torch.equal(m, gt == c) for c, m in zip(present, ft["masks"]))
            assert f["novel_ids"].numel() == 0
    assert seen_novel > 0  # the check of mask-less targets was exercised


def test_mapper_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        WeakShotMapper(AUG, NOVEL, "half", 0)
    with pytest.raises(ValueError, match="novel ids"):
        WeakShotMapper(AUG, None, "weak", 0)


# --- determinism ----------------------------------------------------------------------------------------


def test_crops_are_deterministic_per_seed_epoch_index_and_change_across_epochs(prepared: Path) -> None:
    a, b = _dataset(prepared, seed=3), _dataset(prepared, seed=3)
    for index in range(len(a)):
        x, y = a[(1, index)], b[(1, index)]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["labels"], y["labels"])
    # set_epoch + integer index is the same item as the (epoch, index) key
    a.set_epoch(1)
    assert torch.equal(a[2]["image"], b[(1, 2)]["image"])
    differs = [not torch.equal(a[(0, i)]["image"], a[(1, i)]["image"]) for i in range(len(a))]
    assert all(differs)
    other_seed = _dataset(prepared, seed=4)
    assert any(not torch.equal(a[(0, i)]["image"], other_seed[(0, i)]["image"]) for i in range(len(a)))


# --- transforms -----------------------------------------------------------------------------------------


def _asymmetric() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((20, 24), dtype=np.uint8)
    label[:, 16:] = 1
    label[3:7, 2:5] = 255
    image = np.zeros((20, 24, 3), dtype=np.uint8)
    image[..., 0] = np.arange(24, dtype=np.uint8)[None, :] * 10  # red encodes the column
    image[..., 1] = label * 100
    return image, label


def test_flip_moves_image_and_label_together() -> None:
    image, label = _asymmetric()
    # No scaling (shortest edge stays 20), crop larger than the image, no colour: only the flip is random.
    aug = AugmentConfig(crop_size=32, min_scale=1.0, max_scale=1.0, test_size=20, color_jitter=False)
    outcomes = set()
    for seed in range(12):
        out_image, out_label, pad_mask = T.train_augment(image, label, aug, np.random.default_rng(seed))
        core_image, core_label = out_image[:20, :24], out_label[:20, :24]
        if np.array_equal(core_label, label):
            assert np.array_equal(core_image, image)
            outcomes.add("kept")
        else:
            assert np.array_equal(core_label, label[:, ::-1])
            assert np.array_equal(core_image, image[:, ::-1])
            outcomes.add("flipped")
        assert not pad_mask[:20, :24].any()
    assert outcomes == {"kept", "flipped"}


def test_padding_values_and_pad_mask() -> None:
    image, label = _asymmetric()
    aug = AugmentConfig(crop_size=40, min_scale=1.0, max_scale=1.0, test_size=20, color_jitter=False, flip=False)
    out_image, out_label, pad_mask = T.train_augment(image, label, aug, np.random.default_rng(0))
    assert out_image.shape == (64, 64, 3) and out_label.shape == pad_mask.shape == (64, 64)  # 40 -> 64
    expected_mask = np.ones((64, 64), dtype=bool)
    expected_mask[:20, :24] = False
    assert np.array_equal(pad_mask, expected_mask)
    assert (out_image[pad_mask] == 128).all() and (out_label[pad_mask] == 255).all()
    assert np.array_equal(out_image[:20, :24], image) and np.array_equal(out_label[:20, :24], label)
    assert T.round_up(32) == 32 and T.round_up(33) == 64


def test_scale_jitter_range_and_nearest_labels() -> None:
    label = np.repeat(np.arange(4, dtype=np.uint8), 10)[None].repeat(30, axis=0)  # 30 x 40
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    aug = AugmentConfig(min_scale=0.5, max_scale=2.0, test_size=30)
    shorts = []
    for seed in range(30):
        out_image, out_label = T.random_scale(image, label, aug, np.random.default_rng(seed))
        assert out_image.shape[:2] == out_label.shape
        shorts.append(min(out_label.shape))
        assert set(np.unique(out_label).tolist()) <= {0, 1, 2, 3}
    assert 15 <= min(shorts) and max(shorts) <= 60 and len(set(shorts)) > 5


def test_crop_is_redrawn_until_it_holds_a_labelled_pixel() -> None:
    label = np.full((200, 200), 255, dtype=np.uint8)
    label[150:190, 10:50] = 2
    image = np.zeros((200, 200, 3), dtype=np.uint8)
    hits = [(T.random_crop(image, label, 32, 50, np.random.default_rng(s))[1] != 255).any() for s in range(20)]
    single = [(T.random_crop(image, label, 32, 1, np.random.default_rng(s))[1] != 255).any() for s in range(20)]
    assert all(hits) and not all(single)
    small_image, small_label = T.random_crop(image[:10, :300], label[:10, :300], 32, 50, np.random.default_rng(0))
    assert small_label.shape == (10, 32) and small_image.shape == (10, 32, 3)


def test_color_jitter_hsv_round_trip_and_determinism() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    assert np.array_equal(T.hsv_to_rgb(*T.rgb_to_hsv(image)), image)
    hue, saturation, value = T.rgb_to_hsv(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8))
    assert np.allclose(hue, [[0, 120, 240]]) and np.allclose(saturation, 1) and np.allclose(value, 255)
    jittered = [T.color_aug_ssd(image, np.random.default_rng(s)) for s in range(8)]
    assert all(j.dtype == np.uint8 and j.shape == image.shape for j in jittered)
    assert any(not np.array_equal(j, image) for j in jittered)
    assert np.array_equal(T.color_aug_ssd(image, np.random.default_rng(5)), jittered[5])


def test_shortest_edge_size_caps_the_long_edge() -> None:
    assert T.shortest_edge_size(48, 64, 32, 128) == (32, 43)
    assert T.shortest_edge_size(10, 100, 32, 128) == (13, 128)


# --- reading --------------------------------------------------------------------------------------------


def test_pseudo_labels_override_and_fall_back_to_ground_truth(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for i, (h, w) in enumerate(TRAIN_SIZES[:-1]):  # the last image has no pseudo-label
        Image.fromarray(np.full((h, w), 3, dtype=np.uint8)).save(pseudo / f"train_{i}.png")
    with caplog.at_level(logging.WARNING):
        source = SegmentationDataset(prepared, "train", labels_dir=pseudo)
    assert source.pseudo_fallbacks == [f"train_{len(TRAIN_SIZES) - 1}"]
    assert "1 of 5 images have no pseudo-label" in caplog.text
    assert (source.load(0)[1] == 3).all()
    gt = np.asarray(Image.open(prepared / "labels" / "train" / f"train_{len(TRAIN_SIZES) - 1}.png"))
    assert np.array_equal(source.load(len(TRAIN_SIZES) - 1)[1], gt)
    # The full-mode mapper (retraining) sees the pseudo-labels as mask targets.
    sample = _dataset(prepared, "full", labels_dir=pseudo)[(0, 0)]
    assert set(torch.unique(sample["labels"]).tolist()) <= {3, 255}
    assert sample["targets"]["labels"].tolist() == [3]


def test_reading_errors_name_the_file(prepared: Path) -> None:
    bad = prepared / "labels" / "train" / "train_1.png"
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(bad)
    source = SegmentationDataset(prepared, "train")
    with pytest.raises(ValueError, match="train_1.png.*differs from image"):
        source.load(1)
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="train_1"):
        SegmentationDataset(prepared, "train")


def test_test_mode_size_bookkeeping(prepared: Path) -> None:
    dataset = TestDataset(prepared, "test", test_size=32)
    first, second = dataset[0], dataset[1]
    assert first["name"] == "test_0" and first["orig_size"] == (48, 64) and first["image_size"] == (32, 43)
    assert first["image"].shape == (3, 32, 64) and first["image"].dtype == torch.uint8
    assert first["pad_mask"][:, 43:].all() and not first["pad_mask"][:, :43].any()
    assert (first["image"][:, :, 43:] == 128).all()
    # 30 x 90: shortest edge 32 -> 32 x 96 (within the 4 x 32 = 128 cap)
    assert second["orig_size"] == (30, 90) and second["image_size"] == (32, 96)
    batch = next(iter(evaluation_loader(dataset)))
    assert batch["images"].shape == (1, 3, 32, 64) and batch["images"].dtype == torch.float32
    assert batch["orig_size"] == [(48, 64)] and batch["image_size"] == [(32, 43)] and batch["names"] == ["test_0"]
    # larger test batches pad to the largest image
    both = collate([first, second])
    assert both["images"].shape == (2, 3, 32, 96) and both["pad_mask"][0, :, 43:].all()


# --- batching -------------------------------------------------------------------------------------------


def test_collate_shapes_and_pair_ordering(prepared: Path) -> None:
    base = _dataset(prepared)
    batch = collate([base[(0, 0)], base[(0, 1)], base[(0, 2)]])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["labels"].shape == (3, 32, 32) and batch["labels"].dtype == torch.int64
    assert batch["pad_mask"].shape == (3, 32, 32) and batch["pad_mask"].dtype == torch.bool
    assert len(batch["targets"]) == 3 and batch["targets"][0]["masks"].shape[1:] == (32, 32)
    assert batch["novel_ids"].tolist() == NOVEL and batch["names"] == ["train_0", "train_1", "train_2"]
    assert "pairs" not in batch

    cross = PairDataset(base, FakeSampler(base.names), "cross")
    batch = collate([cross[(0, 0)], cross[(0, 3)]])
    assert batch["names"] == ["train_0", "train_1", "train_3", "train_4"]  # [in0, ref0, in1, ref1]
    assert batch["pairs"].tolist() == [[0, 1], [2, 3]] and batch["pairs"].dtype == torch.int64
    assert batch["images"].shape == (4, 3, 32, 32) and len(batch["targets"]) == 4
    # the input is the unpaired item of the same key; the reference has its own augmentation stream
    assert torch.equal(batch["images"][0], base[(0, 0)]["image"].float())
    assert not torch.equal(batch["images"][1], base[(0, 1)]["image"].float())
    assert torch.equal(cross[(0, 3)][1]["image"], batch["images"][3].to(torch.uint8))  # deterministic

    selfpair = PairDataset(base, None, "self")
    batch = collate([selfpair[(0, 0)], selfpair[(0, 3)]])
    assert batch["names"] == ["train_0", "train_3"] and batch["pairs"].tolist() == [[0, 0], [1, 1]]


def _stream(dataset, start: int, count: int, workers: int = 0) -> list[dict]:
    loader = infinite_loader(dataset, batch_size=2, num_workers=workers, seed=11, start_iteration=start)
    return [next(loader) for _ in range(count)]


def test_infinite_loader_resumes_exactly_and_ignores_worker_count(prepared: Path) -> None:
    dataset = _dataset(prepared)
    full = _stream(dataset, 0, 9)  # 18 items over 5 images: 4 epochs, batches straddle epoch ends
    names = [b["names"] for b in full]
    flat = [n for b in names for n in b]
    for epoch in range(3):
        assert sorted(flat[5 * epoch : 5 * epoch + 5]) == dataset.names  # each epoch is a permutation
    assert flat[:5] != flat[5:10] or flat[5:10] != flat[10:15]  # reshuffled between epochs
    resumed = _stream(_dataset(prepared), 4, 5)
    for a, b in zip(full[4:], resumed):
        assert a["names"] == b["names"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    with_workers = _stream(_dataset(prepared), 3, 3, workers=2)
    for a, b in zip(full[3:6], with_workers):
        assert a["names"] == b["names"] and torch.equal(a["images"], b["images"])
    # a different seed gives a different order
    other = infinite_loader(dataset, batch_size=2, num_workers=0, seed=12)
    assert [next(other)["names"] for _ in range(5)] != names[:5]


def test_infinite_loader_batches_pairs(prepared: Path) -> None:
    base = _dataset(prepared)
    loader = infinite_loader(PairDataset(base, FakeSampler(base.names)), batch_size=2, num_workers=0, seed=0)
    batch = next(loader)
    assert batch["images"].shape == (4, 3, 32, 32) and batch["pairs"].tolist() == [[0, 1], [2, 3]]


def test_base_mode_drops_novel_classes_entirely(prepared: Path) -> None:
    base, weak = _dataset(prepared, "base"), _dataset(prepared, "weak")
    for index in range(len(base)):
        b, w = base[(0, index)], weak[(0, index)]
        assert torch.equal(b["labels"], w["labels"])  # novel pixels hidden in both
        assert not torch.isin(b["targets"]["labels"], torch.tensor(NOVEL)).any()
        assert bool(b["targets"]["has_mask"].all())
        kept = w["targets"]["has_mask"]
        assert torch.equal(b["targets"]["labels"], w["targets"]["labels"][kept])


def test_decoded_pairs_are_cached_read_only_within_the_budget(prepared: Path) -> None:
    one_pair = 48 * 64 * 4  # train_0: RGB + label bytes
    source = SegmentationDataset(prepared, "train", cache_bytes=one_pair)
    image, label = source.load(0)
    assert not image.flags.writeable and not label.flags.writeable
    # The file is not read again: a cached pair survives its files being replaced.
    Image.fromarray(np.zeros((48, 64), dtype=np.uint8)).save(prepared / "labels" / "train" / "train_0.png")
    again_image, again_label = source.load(0)
    assert again_image is image and again_label is label
    # The budget is full: the next pair is decoded on every load.
    assert source.load(1)[0] is not source.load(1)[0]
    uncached = SegmentationDataset(prepared, "train", cache_bytes=0)
    assert not uncached.load(0)[1].any()  # read from the replaced file


def test_same_size_batches_keep_name_order_and_never_mix_sizes() -> None:
    sizes = [(32, 32), (32, 32), (32, 32), (32, 64), (32, 32), (32, 32)]
    assert list(SameSizeBatches(sizes, 2)) == [[0, 1], [2], [3], [4, 5]]
    assert list(SameSizeBatches(sizes, 16)) == [[0, 1, 2], [3], [4, 5]]
    assert len(SameSizeBatches(sizes, 1)) == 6
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        SameSizeBatches(sizes, 0)


def test_padded_size_from_the_header_is_the_size_of_the_item(prepared: Path) -> None:
    dataset = TestDataset(prepared, "test", test_size=32)
    assert [dataset.padded_size(i) for i in range(len(dataset))] == [
        tuple(dataset[i]["image"].shape[-2:]) for i in range(len(dataset))
    ]
    batches = list(evaluation_loader(dataset))
    assert [name for batch in batches for name in batch["names"]] == dataset.names
    for batch in batches:  # no image is padded beyond its own padded size
        for name in batch["names"]:
            assert tuple(batch["images"].shape[-2:]) == dataset.padded_size(dataset.names.index(name))
