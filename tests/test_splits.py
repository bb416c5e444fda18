"""Class splits (the paper's and the embedded dataset's) and image-level labels."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from weakshot.cli import main as cli_main
from weakshot.data.classes import ClassInfo, ClassTable
from weakshot.data.splits import (
    SplitSpec,
    read_image_labels,
    split_novel_ids,
    write_image_labels,
    write_split,
    write_split_image_labels,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_REFERENCE = ROOT / "config" / "paper_splits.yaml"
# The reference the project was built from; CI clones the repository with shared/ beside it.
SHARED_REFERENCE = ROOT.parent / "shared" / "reference" / "splits" / "paper_splits.yaml"
RATIOS = (0.30, 0.35, 0.40, 0.45, 0.50)


def reference_file() -> Path:
    return SHARED_REFERENCE if SHARED_REFERENCE.exists() else CONFIG_REFERENCE


def paper_spec(key: str) -> SplitSpec:
    return SplitSpec.from_dict({"source": "paper", "reference": str(CONFIG_REFERENCE), "reference_key": key})


def embedded_table(num_classes: int = 44) -> ClassTable:
    return ClassTable("toy", tuple(ClassInfo(i, f"class{i}", i + 1) for i in range(num_classes)))


def test_config_copy_equals_shared_reference():
    if not SHARED_REFERENCE.exists():
        pytest.skip(f"{SHARED_REFERENCE} is not beside this checkout")
    assert yaml.safe_load(CONFIG_REFERENCE.read_text()) == yaml.safe_load(SHARED_REFERENCE.read_text())


@pytest.mark.parametrize("dataset", ["coco_stuff_10k", "ade20k"])
def test_class_tables_match_paper_class_lists(dataset):
    reference = yaml.safe_load(reference_file().read_text())[dataset]
    table = ClassTable.load(ROOT / "config" / "classes" / f"{dataset}.yaml")
    assert table.num_classes == reference["num_classes"]
    assert table.names == reference["class_names"]
    if dataset == "coco_stuff_10k":
        assert [c.dataset_id for c in table.classes] == reference["raw_coco_ids"]
        assert {c.kind for c in table.classes[:80]} == {"thing"}
        assert {c.kind for c in table.classes[80:]} == {"stuff"}
    else:
        assert [c.dataset_id for c in table.classes] == list(range(1, 151))  # PNG value = id + 1


@pytest.mark.parametrize(
    "dataset,expected_names",
    [("coco_stuff_10k", [f"split{i}" for i in range(1, 10)]), ("ade20k", [f"split{i}" for i in range(1, 5)])],
)
def test_paper_split_files_equal_reference_lists(tmp_path, dataset, expected_names):
    reference = yaml.safe_load(reference_file().read_text())[dataset]
    classes = ROOT / "config" / "classes" / f"{dataset}.yaml"
    spec = paper_spec(dataset)
    for name in expected_names:
        out = tmp_path / f"{name}.yaml"
        write_split(classes, spec, name, out)
        record = yaml.safe_load(out.read_text())
        assert record["novel_ids"] == sorted(reference[name]["novel_ids"])
        assert record["novel_names"] == reference[name]["novel_names"]
        assert sorted(record["base_ids"] + record["novel_ids"]) == list(range(reference["num_classes"]))
    with pytest.raises(KeyError, match="split10"):
        write_split(classes, spec, "split10", tmp_path / "split10.yaml")


def test_coco_splits_4_to_9_follow_the_fixed_permutation():
    """Split 4 is randp[:43] and Splits 5-9 are randp[:int(171 r)] (the appendix construction)."""
    reference = yaml.safe_load(reference_file().read_text())["coco_stuff_10k"]
    randp = reference["random_permutation_randp"]
    table = ClassTable.load(ROOT / "config" / "classes" / "coco_stuff_10k.yaml")
    splits = split_novel_ids(table, paper_spec("coco_stuff_10k"))
    assert sorted(splits["split4"]) == sorted(randp[:43])
    for index, ratio in enumerate(RATIOS, start=5):
        assert sorted(splits[f"split{index}"]) == sorted(randp[: int(171 * ratio)])
    assert [len(splits[f"split{i}"]) for i in range(4, 10)] == [43, 51, 59, 68, 76, 85]


@pytest.mark.parametrize("num_classes", [40, 44, 48])
def test_random_splits_nested_with_stated_ratios(num_classes):
    spec = SplitSpec.from_dict(
        {"source": "random", "num_random": 4, "novel_fraction": 0.25, "extra_novel_ratios": list(RATIOS), "seed": 3}
    )
    splits = split_novel_ids(embedded_table(num_classes), spec)
    assert list(splits) == [f"split{i}" for i in range(1, 10)]
    for i in range(1, 5):
        novel = splits[f"split{i}"]
        assert len(novel) == len(set(novel)) == round(num_classes / 4)
        assert all(0 <= c < num_classes for c in novel)
    assert len({tuple(sorted(splits[f"split{i}"])) for i in range(1, 5)}) == 4, "random splits must differ"
    previous = set(splits["split4"])
    for index, ratio in enumerate(RATIOS, start=5):
        novel = set(splits[f"split{index}"])
        assert len(novel) == int(num_classes * ratio)
        assert previous < novel, f"split{index} must strictly extend the split before it"
        previous = novel


def test_random_splits_are_seeded():
    base = {"source": "random", "num_random": 4, "novel_fraction": 0.25, "extra_novel_ratios": list(RATIOS)}
    first = split_novel_ids(embedded_table(), SplitSpec.from_dict({**base, "seed": 0}))
    again = split_novel_ids(embedded_table(), SplitSpec.from_dict({**base, "seed": 0}))
    other = split_novel_ids(embedded_table(), SplitSpec.from_dict({**base, "seed": 1}))
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"source": "random", "novel_fraction": 0.25, "num_randm": 4}, "unknown key 'num_randm'"),
        ({"source": "random", "novel_fraction": 1.5}, "novel_fraction"),
        ({"source": "random", "extra_novel_ratios": [0.5, 0.3]}, "extra_novel_ratios"),
        ({"source": "paper"}, "reference"),
        ({"source": "guess"}, "'source'"),
    ],
)
def test_bad_split_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        SplitSpec.from_dict(settings)


def test_paper_splits_refuse_a_different_class_list(tmp_path):
    with pytest.raises(ValueError, match="class list"):
        split_novel_ids(embedded_table(171), paper_spec("coco_stuff_10k"))


def _prepared(tmp_path: Path, label_maps: dict[str, np.ndarray], num_classes: int) -> Path:
    root = tmp_path / "prepared"
    (root / "labels" / "train").mkdir(parents=True)
    embedded_table(num_classes).save(root / "classes.yaml")
    for name, labels in label_maps.items():
        Image.fromarray(labels.astype(np.uint8)).save(root / "labels" / "train" / f"{name}.png")
    return root


def test_image_labels_and_split_partition(tmp_path):
    a = np.full((6, 5), 255, np.uint8)
    a[:3] = 0
    a[3:, :2] = 2
    a[5, 4] = 3  # one pixel: present at min_pixels 1, absent at 2
    b = np.full((4, 4), 1, np.uint8)
    prepared = _prepared(tmp_path, {"img_a": a, "img_b": b}, num_classes=4)

    out = tmp_path / "image_labels.tsv"
    assert write_image_labels(prepared, out, min_pixels=1) == 2
    assert read_image_labels(out) == {"img_a": [0, 2, 3], "img_b": [1]}
    write_image_labels(prepared, out, min_pixels=2)
    assert read_image_labels(out) == {"img_a": [0, 2], "img_b": [1]}

    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump({"name": "s", "num_classes": 4, "base_ids": [0, 1, 3], "novel_ids": [2]}))
    per_split = tmp_path / "split_image_labels.tsv"
    write_split_image_labels(out, split, per_split)
    rows = [line.split("\t") for line in per_split.read_text().splitlines()]
    assert rows == [["image", "base_ids", "novel_ids"], ["img_a", "0", "2"], ["img_b", "1", ""]]


def test_image_labels_reject_values_outside_the_class_table(tmp_path):
    bad = np.zeros((3, 3), np.uint8)
    bad[1, 1] = 7
    prepared = _prepared(tmp_path, {"img": bad}, num_classes=4)
    with pytest.raises(ValueError, match=r"img\.png: label value 7"):
        write_image_labels(prepared, tmp_path / "out.tsv")
    assert not (tmp_path / "out.tsv").exists()


def test_split_cli_writes_one_split_and_reports_bad_json(tmp_path, capsys):
    classes = tmp_path / "classes.yaml"
    embedded_table().save(classes)
    spec = '{"source": "random", "num_random": 4, "novel_fraction": 0.25, "extra_novel_ratios": [0.3], "seed": 0}'
    out = tmp_path / "split5.yaml"
    assert cli_main(["split", "--classes", str(classes), "--spec", spec, "--name", "split5", "--out", str(out)]) == 0
    assert len(yaml.safe_load(out.read_text())["novel_ids"]) == int(44 * 0.3)
    bad = '{"source": "random", "seeed": 1}'
    assert cli_main(["split", "--classes", str(classes), "--spec", bad, "--name", "split1", "--out", str(out)]) == 1
    assert "unknown key 'seeed'" in capsys.readouterr().err
