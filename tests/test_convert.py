"""Raw archive -> download -> verify -> extract -> prepared dataset, for COCO-Stuff-10K and ADE20K.

The fixtures write small archives in the real layouts with their own code (not the converters'):
COCO-Stuff-10K v1.0 (MATLAB v7.3 = HDF5, ``S`` stored column-major, so h5py sees W x H; 1 =
unlabeled, 2..172 = classes), v1.1 (MATLAB v5 via scipy, raw COCO ids with 0 and unused ids) and
ADEChallengeData2016 (PNG 0 = other, 1..150). Images are non-square so a missing transpose fails.
Expected labels are computed here, independently, from the raw ids the fixture drew.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import yaml
from PIL import Image

from weakshot import cli
from weakshot.data import prepared
from weakshot.data.ade20k import convert_ade20k
from weakshot.data.archives import download, safe_extract
from weakshot.data.classes import ClassTable
from weakshot.data.cocostuff import convert_cocostuff

REPO = Path(__file__).resolve().parents[1]
COCO_CLASSES = REPO / "config" / "classes" / "coco_stuff_10k.yaml"
ADE_CLASSES = REPO / "config" / "classes" / "ade20k.yaml"

# COCO ids 1..182 that COCO-Stuff never uses (cocostuff-labels.txt); the other 171 are the classes.
UNUSED_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
USED_COCO_IDS = [i for i in range(1, 183) if i not in UNUSED_COCO_IDS]
# Raw v1.1 values the fixture draws from: unlabeled, unused ids, and classes at both ends.
COCO_PALETTE = np.array([0, 12, 26, 91, 1, 2, 11, 13, 90, 92, 150, 181, 182])
MATLAB_V73_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Fri Jan 15 12:00:00 2016 HDF5 schema 1.00 ."


@dataclass(frozen=True)
class RawSample:
    split: str
    name: str
    coco_ids: np.ndarray  # H x W raw v1.1 ids (COCO ids, 0 = unlabeled)
    image: np.ndarray  # H x W x 3 uint8 (or H x W for a greyscale COCO image)


def coco_expected(coco_ids: np.ndarray) -> np.ndarray:
    """Contiguous id = position among the 171 used COCO ids; unlabeled and unused ids -> 255."""
    expected = np.full(coco_ids.shape, 255, dtype=np.uint8)
    for position, coco_id in enumerate(USED_COCO_IDS):
        expected[coco_ids == coco_id] = position
    return expected


def coco_to_v10(coco_ids: np.ndarray) -> np.ndarray:
    """v1.0 ids: 1 = unlabeled (also where v1.1 has an unused id), 2 + position for the classes."""
    v10 = np.ones(coco_ids.shape, dtype=np.float64)  # MATLAB stores double by default
    for position, coco_id in enumerate(USED_COCO_IDS):
        v10[coco_ids == coco_id] = position + 2
    return v10


def make_coco_samples(seed: int = 0) -> list[RawSample]:
    rng = np.random.default_rng(seed)
    shapes = {"train": [(7, 11), (11, 7), (5, 9), (9, 6), (8, 13)], "test": [(6, 10), (10, 5)]}
    samples: list[RawSample] = []
    counter = 77
    for split, split_shapes in shapes.items():
        for h, w in split_shapes:
            counter += 17
            ids = rng.choice(COCO_PALETTE, size=(h, w))
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if counter == 77 + 17 * 2:
                image = image[..., 0]  # some COCO images are greyscale
            samples.append(RawSample(split, f"COCO_train2014_{counter:012d}", ids, image))
    return samples


def write_coco_raw(root: Path, samples: list[RawSample], version: str) -> None:
    """Write images/, annotations/ and imageLists/ the way the official v1.0 / v1.1 zips hold them."""
    for sub in ("images", "annotations", "imageLists"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in samples:
        Image.fromarray(s.image).save(root / "images" / f"{s.name}.jpg", quality=90)
        mat = root / "annotations" / f"{s.name}.mat"
        if version == "v1.0":
            with h5py.File(mat, "w", userblock_size=512) as f:
                # Column-major MATLAB array: h5py sees the transpose (W x H).
                f.create_dataset("S", data=coco_to_v10(s.coco_ids).T)
                f.create_dataset("regionMapStuff", data=np.zeros(s.coco_ids.shape[::-1]))
            with open(mat, "r+b") as f:  # the text header MATLAB writes into the user block
                f.write(MATLAB_V73_HEADER.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")
        else:
            scipy.io.savemat(
                mat,
                {"S": s.coco_ids.astype(np.uint16), "names": np.array(["unlabeled", "person"], dtype=object),
                 "captions": np.zeros((0, 0))},
            )  # fmt: skip
    for split in ("train", "test"):
        names = [s.name for s in samples if s.split == split]
        (root / "imageLists" / f"{split}.txt").write_text("\n".join(names) + "\n")
    (root / "imageLists" / "all.txt").write_text("\n".join(s.name for s in samples) + "\n")


def zip_folder(folder: Path, archive: Path) -> bytes:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())
    return archive.read_bytes()


def fetch_and_extract(url: str, data: bytes, work: Path) -> Path:
    """The pipeline's first two stages with the archive's real sha256 pinned."""
    archive = download(url, work / "archive.zip", sha256=hashlib.sha256(data).hexdigest(), progress=False)
    return safe_extract(archive, work / "raw")


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L", f"{path}: mode {image.mode}"
        return np.asarray(image)


@pytest.fixture(scope="module")
def coco_samples() -> list[RawSample]:
    return make_coco_samples()


@pytest.fixture(scope="module")
def coco_table() -> ClassTable:
    table = ClassTable.load(COCO_CLASSES)
    # The shipped table must be the 171 used COCO ids in ascending order (MaskFormer's order).
    assert [c.dataset_id for c in table.classes] == USED_COCO_IDS
    return table


def build_coco_archive(tmp_path: Path, samples: list[RawSample], version: str, top: str | None) -> tuple[Path, bytes]:
    src = tmp_path / f"src-{version}"
    write_coco_raw(src / top if top else src, samples, version)
    data = zip_folder(src, tmp_path / f"cocostuff-10k-{version}.zip")
    return tmp_path / f"cocostuff-10k-{version}.zip", data


# -------------------------------------------------------------------------------------- COCO-Stuff


@pytest.mark.parametrize(("version", "top"), [("v1.1", None), ("v1.0", "cocostuff-10k-v1.0")])
def test_cocostuff_end_to_end(http_server, tmp_path, coco_samples, coco_table, version, top) -> None:
    _, data = build_coco_archive(tmp_path, coco_samples, version, top)
    url = http_server.add_file(f"cocostuff-10k-{version}.zip", data)
    raw = fetch_and_extract(url, data, tmp_path / "work")
    excluded = coco_samples[1].name
    out = tmp_path / "prepared"
    summary = convert_cocostuff(raw, out, coco_table, exclude_train=[excluded, "COCO_not_in_list"], workers=1)

    for s in coco_samples:
        label_path = out / "labels" / s.split / f"{s.name}.png"
        image_path = out / "images" / s.split / f"{s.name}.jpg"
        if s.name == excluded:
            assert not label_path.exists() and not image_path.exists()
            continue
        label = read_png(label_path)
        assert label.shape == s.coco_ids.shape
        np.testing.assert_array_equal(label, coco_expected(s.coco_ids), err_msg=f"{version} {s.name}")
        src_image = raw / top / "images" / f"{s.name}.jpg" if top else raw / "images" / f"{s.name}.jpg"
        assert image_path.read_bytes() == src_image.read_bytes()

    on_disk = yaml.safe_load((out / "summary.yaml").read_text())
    assert on_disk == summary
    assert summary["counts"] == {"train": 4, "test": 2}
    assert summary["label_formats"] == {version: 6}
    assert summary["excluded_train"]["skipped"] == 1
    assert summary["excluded_train"]["names"] == [excluded]
    assert summary["excluded_train"]["not_in_train_list"] == ["COCO_not_in_list"]
    assert ClassTable.load(out / "classes.yaml") == coco_table
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_cocostuff_v10_and_v11_give_identical_pngs(tmp_path, coco_samples, coco_table, monkeypatch) -> None:
    monkeypatch.setattr(prepared, "POOL_MIN_SAMPLES", 0)  # use the worker pool even for 7 samples
    pools: list[int] = []
    real_executor = prepared.ProcessPoolExecutor

    def counting_executor(workers: int, **kwargs):
        pools.append(workers)
        return real_executor(workers, **kwargs)

    monkeypatch.setattr(prepared, "ProcessPoolExecutor", counting_executor)
    outs = {}
    for version in ("v1.0", "v1.1"):
        raw = tmp_path / f"raw-{version}"
        write_coco_raw(raw, coco_samples, version)
        outs[version] = tmp_path / f"prepared-{version}"
        # The pool path (spawned workers) on one of the two, the in-process path on the other.
        convert_cocostuff(raw, outs[version], coco_table, workers=2 if version == "v1.0" else 1)
    assert pools == [2]
    for s in coco_samples:
        a = outs["v1.0"] / "labels" / s.split / f"{s.name}.png"
        b = outs["v1.1"] / "labels" / s.split / f"{s.name}.png"
        np.testing.assert_array_equal(read_png(a), read_png(b))
        assert a.read_bytes() == b.read_bytes()


def test_cocostuff_excluded_names_only_apply_to_train(tmp_path, coco_samples, coco_table) -> None:
    raw = tmp_path / "raw"
    write_coco_raw(raw, coco_samples, "v1.1")
    test_name = next(s.name for s in coco_samples if s.split == "test")
    summary = convert_cocostuff(raw, tmp_path / "out", coco_table, exclude_train=[test_name], workers=1)
    assert summary["counts"] == {"train": 5, "test": 2}
    assert summary["excluded_train"] == {
        "requested": 1, "skipped": 0, "names": [], "not_in_train_list": [test_name],
    }  # fmt: skip
    assert (tmp_path / "out" / "labels" / "test" / f"{test_name}.png").exists()


def test_cocostuff_missing_annotation_is_named_and_nothing_written(tmp_path, coco_samples, coco_table) -> None:
    raw = tmp_path / "raw"
    write_coco_raw(raw, coco_samples, "v1.1")
    missing = raw / "annotations" / f"{coco_samples[3].name}.mat"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        convert_cocostuff(raw, tmp_path / "out", coco_table, workers=1)
    assert not (tmp_path / "out").exists()


def test_cocostuff_shape_mismatch_is_named_and_nothing_written(tmp_path, coco_samples, coco_table) -> None:
    raw = tmp_path / "raw"
    write_coco_raw(raw, coco_samples, "v1.0")
    victim = coco_samples[-1]
    # An image whose size is the label's transpose: a converter that forgot the transpose would pass.
    h, w = victim.coco_ids.shape
    Image.fromarray(np.zeros((w, h, 3), dtype=np.uint8)).save(raw / "images" / f"{victim.name}.jpg")
    with pytest.raises(ValueError, match=f"{victim.name}.mat: label shape \\({h}, {w}\\)"):
        convert_cocostuff(raw, tmp_path / "out", coco_table, workers=1)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cocostuff_v10_needs_the_171_class_table(tmp_path, coco_samples) -> None:
    raw = tmp_path / "raw"
    write_coco_raw(raw, coco_samples, "v1.0")
    small = ClassTable.load(ADE_CLASSES)  # 150 classes: v1.0 ids cannot refer to it
    with pytest.raises(ValueError, match="v1.0 annotation \\(HDF5\\), which needs the 171-class table"):
        convert_cocostuff(raw, tmp_path / "out", small, workers=1)


# ------------------------------------------------------------------------------------------ ADE20K


def make_ade_raw(root: Path, seed: int = 1) -> dict[tuple[str, str], np.ndarray]:
    """ADEChallengeData2016 with 4 training and 2 validation images; returns the raw PNG values."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    raws: dict[tuple[str, str], np.ndarray] = {}
    shapes = {"training": [(7, 11), (11, 7), (6, 9), (5, 8)], "validation": [(9, 4), (7, 12)]}
    for folder, folder_shapes in shapes.items():
        (base / "images" / folder).mkdir(parents=True)
        (base / "annotations" / folder).mkdir(parents=True)
        prefix = "ADE_train" if folder == "training" else "ADE_val"
        for i, (h, w) in enumerate(folder_shapes, start=1):
            name = f"{prefix}_{i:08d}"
            values = rng.choice(np.array([0, 1, 2, 75, 149, 150]), size=(h, w)).astype(np.uint8)
            if folder == "training" and i == 3:
                values[:] = 0  # an all-"other" image, like the 16 SimFormer skips
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                base / "images" / folder / f"{name}.jpg"
            )
            Image.fromarray(values).save(base / "annotations" / folder / f"{name}.png")
            raws[("train" if folder == "training" else "test", name)] = values
    (base / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n2\t0.1072\t6046\t612\tbuilding, edifice\n"
    )
    (base / "sceneCategories.txt").write_text("ADE_train_00000001 airport_terminal\n")
    return raws


def test_ade20k_end_to_end(http_server, tmp_path) -> None:
    src = tmp_path / "src"
    raws = make_ade_raw(src)
    data = zip_folder(src, tmp_path / "ADEChallengeData2016.zip")
    raw = fetch_and_extract(http_server.add_file("ADEChallengeData2016.zip", data), data, tmp_path / "work")
    table = ClassTable.load(ADE_CLASSES)
    out = tmp_path / "prepared"
    summary = convert_ade20k(raw, out, table, exclude_train=["ADE_train_00000002"], workers=1)

    for (split, name), values in raws.items():
        label_path = out / "labels" / split / f"{name}.png"
        if name == "ADE_train_00000002":
            assert not label_path.exists()
            continue
        expected = np.where(values == 0, 255, values.astype(np.int64) - 1).astype(np.uint8)
        np.testing.assert_array_equal(read_png(label_path), expected, err_msg=name)
        assert (out / "images" / split / f"{name}.jpg").is_file()
    assert summary["counts"] == {"train": 3, "test": 2}
    assert summary["train_all_ignore"] == ["ADE_train_00000003"]
    assert summary["excluded_train"]["names"] == ["ADE_train_00000002"]
    assert ClassTable.load(out / "classes.yaml") == table


def test_ade20k_value_outside_class_table_is_an_error(tmp_path) -> None:
    raws = make_ade_raw(tmp_path / "raw")
    name = next(n for (split, n) in raws if split == "test")
    bad = raws[("test", name)].copy()
    bad[0, 0] = 151
    Image.fromarray(bad).save(tmp_path / "raw" / "ADEChallengeData2016" / "annotations" / "validation" / f"{name}.png")
    with pytest.raises(ValueError, match=f"{name}.png: raw label values \\[151\\]"):
        convert_ade20k(tmp_path / "raw", tmp_path / "out", ClassTable.load(ADE_CLASSES), workers=1)
    assert not (tmp_path / "out").exists()


def test_ade20k_root_not_found(tmp_path) -> None:
    (tmp_path / "raw" / "something").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no ADE20K folder"):
        convert_ade20k(tmp_path / "raw", tmp_path / "out", ClassTable.load(ADE_CLASSES), workers=1)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_prepare_runs_and_reports_errors_in_one_line(tmp_path, coco_samples, capsys) -> None:
    raw = tmp_path / "raw"
    write_coco_raw(raw / "top", coco_samples, "v1.1")
    out = tmp_path / "prepared"
    args = ["prepare", "--layout", "coco_stuff_10k", "--raw", str(raw), "--classes", str(COCO_CLASSES)]
    assert cli.main([*args, "--out", str(out), "--exclude-train", coco_samples[0].name]) == 0
    assert yaml.safe_load((out / "summary.yaml").read_text())["counts"] == {"train": 4, "test": 2}

    capsys.readouterr()
    assert cli.main([*args[:4], str(tmp_path / "nope"), *args[5:], "--out", str(tmp_path / "o2")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error (prepare):") and "nope" in lines[-1]
