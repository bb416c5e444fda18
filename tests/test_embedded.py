"""Tests of the embedded procedural dataset: determinism, the raw COCO-Stuff-10K v1.1 layout, the class table
and the acceptance properties of datasets.md section 4 (class counts, ignore share, shared colours)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from weakshot.cli import main as cli_main
from weakshot.data.classes import ClassTable
from weakshot.data.embedded import (
    EmbeddedConfig,
    build_design,
    dataset_statistics,
    generate_embedded,
    iter_archive,
    render_image,
)

SMALL = {"seed": 1, "num_train": 40, "num_test": 10}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """The small config drawn twice (1 and 2 workers) and once with another seed."""
    root = tmp_path_factory.mktemp("embedded")
    out = {}
    for key, spec, workers in (("a", SMALL, 1), ("b", SMALL, 2), ("other", {**SMALL, "seed": 2}, 1)):
        archive, classes = root / f"{key}.zip", root / f"{key}_classes.yaml"
        generate_embedded(EmbeddedConfig.from_dict(spec), archive=archive, classes=classes, workers=workers)
        out[key] = (archive, classes)
    return out


def _read_all(archive: Path) -> dict[str, tuple[bytes, np.ndarray]]:
    """JPEG bytes and label map of every image, by name."""
    out = {}
    with zipfile.ZipFile(archive) as zf:
        for name in zf.read("imageLists/all.txt").decode().split():
            label = scipy.io.loadmat(io.BytesIO(zf.read(f"annotations/{name}.mat")))["S"]
            out[name] = (zf.read(f"images/{name}.jpg"), label)
    return out


def test_same_config_gives_identical_archives_for_any_worker_count(runs):
    a, b = _read_all(runs["a"][0]), _read_all(runs["b"][0])
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], f"JPEG bytes of {name} differ"
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
    # Fixed zip timestamps and MAT headers make the whole archive byte-identical.
    digest = [hashlib.sha256(runs[k][0].read_bytes()).hexdigest() for k in ("a", "b")]
    assert digest[0] == digest[1]
    assert runs["a"][1].read_text() == runs["b"][1].read_text()


def test_another_seed_gives_other_images_but_the_same_classes(runs):
    a, other = _read_all(runs["a"][0]), _read_all(runs["other"][0])
    assert a.keys() == other.keys()
    differing = sum(not np.array_equal(a[n][1], other[n][1]) for n in a)
    assert differing == len(a)
    assert runs["a"][1].read_text() == runs["other"][1].read_text()


def test_images_do_not_depend_on_drawing_order(runs):
    cfg = EmbeddedConfig.from_dict(SMALL)
    design = build_design(cfg)
    by_name = _read_all(runs["a"][0])
    for index in (7, 3):  # drawn out of order, alone
        drawn = render_image(cfg, design, "train", index)
        np.testing.assert_array_equal(drawn.label, by_name[f"EMB_train_{index + 1:06d}"][1])


def test_archive_has_the_raw_coco_stuff_10k_v11_layout(runs):
    archive = runs["a"][0]
    with zipfile.ZipFile(archive) as zf:
        members = zf.namelist()
        lists = {s: zf.read(f"imageLists/{s}.txt").decode().split() for s in ("train", "test", "all")}
    assert {m.split("/")[0] for m in members} == {"images", "annotations", "imageLists"}
    assert sorted(m for m in members if m.startswith("imageLists/")) == [
        "imageLists/all.txt",
        "imageLists/test.txt",
        "imageLists/train.txt",
    ]
    assert len(lists["train"]) == 40 and len(lists["test"]) == 10
    assert lists["all"] == lists["train"] + lists["test"]
    assert all("." not in n for n in lists["all"])  # names without extension, as in the real lists
    assert sorted(m for m in members if m.startswith("images/")) == sorted(f"images/{n}.jpg" for n in lists["all"])
    assert sorted(m for m in members if m.startswith("annotations/")) == sorted(
        f"annotations/{n}.mat" for n in lists["all"]
    )

    with zipfile.ZipFile(archive) as zf:
        name = lists["test"][0]
        mat = scipy.io.loadmat(io.BytesIO(zf.read(f"annotations/{name}.mat")))
        with Image.open(io.BytesIO(zf.read(f"images/{name}.jpg"))) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            size = img.size
    assert mat["__version__"] == "1.0"  # MATLAB v5
    assert mat["S"].dtype == np.uint8 and mat["S"].shape == (size[1], size[0]) == (64, 64)
    assert mat["names"].size == 44 and "captions" in mat


def test_class_table(runs):
    table = ClassTable.load(runs["a"][1])
    assert table.dataset == "embedded"
    assert table.num_classes >= 40
    kinds = {c.kind for c in table.classes}
    assert kinds == {"stuff", "thing"}
    assert all(c.dataset_id == c.id + 1 for c in table.classes)
    assert len(set(table.names)) == table.num_classes
    assert all(c.name.startswith(c.kind + "-") for c in table.classes)


def test_label_values_classes_per_image_and_ignore_share(runs):
    cfg = EmbeddedConfig.from_dict(SMALL)
    labels = [label for split in ("train", "test") for _, _, label in iter_archive(runs["a"][0], split)]
    for label in labels:
        assert label.max() <= cfg.num_classes
        counts = np.bincount(label.ravel(), minlength=cfg.num_classes + 1)[1:]
        # Classes below min_pixels were turned into unlabeled pixels.
        assert counts[counts > 0].min() >= cfg.resolved_min_pixels()
    stats = dataset_statistics(labels, cfg.num_classes)
    assert stats.classes_per_image.min() >= 3 and stats.classes_per_image.max() <= 6
    assert 0.01 <= stats.ignore_fraction.mean() <= 0.06
    assert stats.ignore_fraction.max() <= 0.12


def test_every_class_appears_in_a_fair_share_of_images():
    cfg = EmbeddedConfig.from_dict({"seed": 3})
    design = build_design(cfg)
    n = 200
    stats = dataset_statistics((render_image(cfg, design, "train", i).label for i in range(n)), cfg.num_classes)
    # About 4.6 classes per image over 44 classes: ~21 images per class expected; none may be starved.
    assert stats.class_image_counts.min() >= 5
    assert stats.class_image_counts.max() <= 60


def test_palettes_are_shared_so_colour_does_not_name_a_class():
    cfg = EmbeddedConfig()
    design = build_design(cfg)
    uses = np.bincount([c.palette for c in design.classes], minlength=cfg.num_palettes)
    assert uses.min() >= 3  # every palette serves several classes

    # Measured on images: some pairs of distinct classes have mean colours closer together than the typical
    # spread of one class's per-image mean colour.
    per_class: dict[int, list[np.ndarray]] = {}
    for i in range(120):
        drawn = render_image(cfg, design, "train", i)
        rgb = drawn.rgb.reshape(-1, 3).astype(float)
        for k in np.unique(drawn.label):
            if k:
                per_class.setdefault(int(k), []).append(rgb[drawn.label.ravel() == k].mean(axis=0))
    ids = sorted(k for k, v in per_class.items() if len(v) >= 3)
    means = np.array([np.mean(per_class[k], axis=0) for k in ids])
    spread = np.median([np.linalg.norm(np.std(per_class[k], axis=0)) for k in ids])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    close_pairs = int(np.sum(np.triu(dist < spread, k=1)))
    assert close_pairs >= 5, f"only {close_pairs} class pairs with mean colours closer than {spread:.1f}"


@pytest.mark.parametrize("size", [32, 96])
def test_other_image_sizes_work(size):
    cfg = EmbeddedConfig.from_dict({"image_size": size})
    design = build_design(cfg)
    for i in range(6):
        drawn = render_image(cfg, design, "test", i)
        assert drawn.rgb.shape == (size, size, 3) and drawn.label.shape == (size, size)
        assert 3 <= len(np.unique(drawn.label[drawn.label > 0])) <= 6


def test_from_dict_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown key 'num_trian'"):
        EmbeddedConfig.from_dict({"num_trian": 10})
    for bad, key in (
        ({"image_size": 8}, "image_size"),
        ({"num_train": "many"}, "num_train"),
        ({"num_test": 2.5}, "num_test"),
        ({"in_scene_prob": True}, "in_scene_prob"),
        ({"num_palettes": 7}, "num_palettes"),
        ({"min_pixels": 0}, "min_pixels"),
    ):
        with pytest.raises(ValueError, match=f"'{key}'"):
            EmbeddedConfig.from_dict(bad)
    # Integers are fine where floats are expected (YAML writes 1.0 as 1 at times).
    assert EmbeddedConfig.from_dict({"in_scene_prob": 1}).in_scene_prob == 1.0
    assert EmbeddedConfig.from_dict({"image_size": 32}).resolved_min_pixels() == 3


def test_cli_generate_embedded(tmp_path, capsys):
    spec = json.dumps({"num_train": 4, "num_test": 2, "image_size": 32})
    archive, classes = tmp_path / "raw.zip", tmp_path / "classes.yaml"
    args = ["generate-embedded", "--spec", spec, "--archive", str(archive), "--classes", str(classes)]
    assert cli_main(args) == 0
    assert zipfile.is_zipfile(archive) and ClassTable.load(classes).num_classes == 44
    assert (
        cli_main(["generate-embedded", "--spec", '{"seeed": 1}', "--archive", str(archive), "--classes", str(classes)])
        == 1
    )
    assert "unknown key 'seeed'" in capsys.readouterr().err
