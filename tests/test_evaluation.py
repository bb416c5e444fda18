"""Tests of the evaluation package: confusion-matrix metric, COCO RLE result files, and the evaluate stage.

The reference metric below is written the slow, obvious way (per class, per image, numpy masks) so the
vectorised confusion matrix is checked against an independent count, not against itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from weakshot.cli import main as cli_main
from weakshot.data.classes import ClassInfo, ClassTable
from weakshot.evaluation.evaluate import evaluate_result_file
from weakshot.evaluation.metrics import SemSegMetric
from weakshot.evaluation.results import (
    ResultWriter,
    decode_image,
    encode_label_map,
    load_result_entries,
    read_results,
    write_results,
)
from weakshot.io_utils import write_yaml

K = 7
IGNORE = 255
BASE = [0, 1, 2, 4]
NOVEL = [3, 5, 6]
NEVER_IN_GT = 5  # predicted somewhere, never in the ground truth
NEVER_PREDICTED = 6  # in the ground truth, never predicted
# Dataset ids deliberately differ from the contiguous ids, as COCO's do.
DATASET_IDS = [1, 2, 3, 5, 7, 11, 13]


def make_images(seed: int = 0, n: int = 5) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, pred, gt) triples of random sizes with ~10% ignore and the two special classes."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = int(rng.integers(5, 40)), int(rng.integers(5, 40))
        gt_classes = [c for c in range(K) if c != NEVER_IN_GT]
        gt = rng.choice(gt_classes, size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = IGNORE
        pred_classes = [c for c in range(K) if c != NEVER_PREDICTED]
        pred = rng.choice(pred_classes, size=(h, w)).astype(np.uint8)
        # Make the prediction correct on about half the pixels so IoUs are not all tiny.
        agree = (rng.random((h, w)) < 0.5) & (gt != IGNORE) & (gt != NEVER_PREDICTED)
        pred[agree] = gt[agree]
        images.append((f"img_{i:03d}", pred, gt))
    return images


def reference_metrics(images: list[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    """Per-class TP/FP/FN counted with loops, then detectron2's and SimFormer's formulas, in percent."""
    tp = np.zeros(K, dtype=np.int64)
    fp = np.zeros(K, dtype=np.int64)
    fn = np.zeros(K, dtype=np.int64)
    for _, pred, gt in images:
        valid = gt != IGNORE
        for c in range(K):
            tp[c] += int(np.sum((pred == c) & (gt == c) & valid))
            fp[c] += int(np.sum((pred == c) & (gt != c) & valid))
            fn[c] += int(np.sum((pred != c) & (gt == c) & valid))
    iou: list[float | None] = []
    acc: list[float | None] = []
    for c in range(K):
        if tp[c] + fn[c] > 0:
            iou.append(100.0 * tp[c] / (tp[c] + fp[c] + fn[c]))
            acc.append(100.0 * tp[c] / (tp[c] + fn[c]))
        else:
            iou.append(None)
            acc.append(None)
    seen = sum(1 for c in range(K) if tp[c] + fp[c] + fn[c] > 0)
    miou = sum(v for v in iou if v is not None) / seen
    total_gt = int((tp + fn).sum())
    fwiou = sum(iou[c] * (tp[c] + fn[c]) / total_gt for c in range(K) if iou[c] is not None)

    def mean(values: list[float | None]) -> float:
        present = [v for v in values if v is not None]
        return sum(present) / len(present)

    base = mean([iou[c] for c in BASE])
    novel = mean([iou[c] for c in NOVEL])
    return {
        "per_class_IoU": iou,
        "per_class_ACC": acc,
        "mIoU": miou,
        "fwIoU": fwiou,
        "mACC": mean(acc),
        "pACC": 100.0 * tp.sum() / total_gt,
        "base_mIoU": base,
        "novel_mIoU": novel,
        "hIoU": 2 * base * novel / (base + novel),
        "base_mACC": mean([acc[c] for c in BASE]),
        "novel_mACC": mean([acc[c] for c in NOVEL]),
    }


def assert_close(actual: dict, expected: dict, keys: list[str]) -> None:
    for key in keys:
        a, e = actual[key], expected[key]
        if isinstance(e, list):
            assert len(a) == len(e), key
            for i, (x, y) in enumerate(zip(a, e)):
                assert (x is None) == (y is None), f"{key}[{i}]: {x} vs {y}"
                if y is not None:
                    assert x == pytest.approx(y, abs=1e-9), f"{key}[{i}]"
        else:
            assert a == pytest.approx(e, abs=1e-9), key


SCALAR_KEYS = ["mIoU", "fwIoU", "mACC", "pACC", "base_mIoU", "novel_mIoU", "hIoU", "base_mACC", "novel_mACC"]


def metric_of(images, device: str = "cpu") -> SemSegMetric:
    metric = SemSegMetric(K, device=device)
    for _, pred, gt in images:
        metric.update(pred, gt)
    return metric


# (a) agreement with the loop reference --------------------------------------------------------------------


def test_metric_matches_loop_reference() -> None:
    images = make_images()
    expected = reference_metrics(images)
    actual = metric_of(images).compute(base_ids=BASE, novel_ids=NOVEL)
    assert_close(actual, expected, SCALAR_KEYS + ["per_class_IoU", "per_class_ACC"])
    # The special classes behave as the conventions say.
    assert actual["per_class_IoU"][NEVER_IN_GT] is None
    assert actual["per_class_IoU"][NEVER_PREDICTED] == 0.0
    # mIoU counts the predicted-but-absent class as 0, the novel mean does not.
    with_gt = [v for v in actual["per_class_IoU"] if v is not None]
    assert actual["mIoU"] == pytest.approx(sum(with_gt) / K)


def test_metric_accepts_torch_and_edge_cases() -> None:
    images = make_images(seed=1, n=2)
    metric = SemSegMetric(K)
    for _, pred, gt in images:
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.int32)))
    assert_close(metric.compute(BASE, NOVEL), reference_metrics(images), SCALAR_KEYS)

    empty = SemSegMetric(K).compute(base_ids=BASE, novel_ids=NOVEL)
    assert empty["mIoU"] is None and empty["hIoU"] is None and empty["num_pixels"] == 0

    perfect = SemSegMetric(3)
    perfect.update(np.array([[0, 1], [2, 2]]), np.array([[0, 1], [2, 255]]))
    scores = perfect.compute(base_ids=[0, 1], novel_ids=[2])
    assert scores["mIoU"] == scores["pACC"] == scores["hIoU"] == 100.0

    zero_novel = SemSegMetric(3)
    zero_novel.update(np.array([0, 1, 0]), np.array([0, 1, 2]))
    assert zero_novel.compute(base_ids=[0, 1], novel_ids=[2])["hIoU"] == 0.0


# (b) batching and merging ---------------------------------------------------------------------------------


def test_batch_update_equals_small_updates_and_merge() -> None:
    rng = np.random.default_rng(3)
    pred = rng.integers(0, K, size=(6, 11, 13))
    gt = rng.integers(0, K, size=(6, 11, 13))
    gt[rng.random(gt.shape) < 0.1] = IGNORE

    batched = SemSegMetric(K)
    batched.update(pred, gt)

    small = SemSegMetric(K)
    for i in range(6):
        for row in range(11):
            small.update(pred[i, row], gt[i, row])

    halves = [SemSegMetric(K), SemSegMetric(K)]
    halves[0].update(pred[:2], gt[:2])
    halves[1].update(pred[2:], gt[2:])
    merged = SemSegMetric(K).merge(halves[0]).merge(halves[1])

    assert torch.equal(batched.confusion, small.confusion)
    assert torch.equal(batched.confusion, merged.confusion)
    assert batched.num_pixels == pred.size
    assert batched.compute(BASE, NOVEL) == merged.compute(BASE, NOVEL)

    merged.reset()
    assert merged.num_pixels == 0
    with pytest.raises(ValueError, match="cannot merge"):
        batched.merge(SemSegMetric(K + 1))


# (c) RLE round trip ---------------------------------------------------------------------------------------


def test_rle_round_trip(tmp_path: Path) -> None:
    images = make_images(seed=2)
    id_to_did = dict(enumerate(DATASET_IDS))
    did_to_id = {d: i for i, d in id_to_did.items()}

    entries = []
    for name, _, gt in images:  # the ground truth has 255 pixels, which must come back as 255
        entries += encode_label_map(f"{name}.jpg", gt, id_to_did)
    assert all(e["category_id"] in DATASET_IDS for e in entries)
    assert all(isinstance(e["segmentation"]["counts"], str) for e in entries)

    path = tmp_path / "results.json"
    write_results(path, entries)
    assert isinstance(json.loads(path.read_text()), list)
    decoded = read_results(path, did_to_id)
    assert list(decoded) == [f"{name}.jpg" for name, _, _ in images]
    for name, _, gt in images:
        np.testing.assert_array_equal(decoded[f"{name}.jpg"], gt)
        assert decoded[f"{name}.jpg"].dtype == np.uint8

    # The streaming writer produces the same file content.
    streamed = tmp_path / "streamed.json"
    with ResultWriter(streamed, id_to_did) as writer:
        for name, _, gt in images:
            writer.add(f"{name}.jpg", gt)
    assert json.loads(streamed.read_text()) == json.loads(path.read_text())

    # An exception inside the writer's block leaves no file behind.
    aborted = tmp_path / "aborted.json"
    with pytest.raises(RuntimeError):
        with ResultWriter(aborted, id_to_did) as writer:
            writer.add("x.jpg", images[0][2])
            raise RuntimeError("boom")
    assert not aborted.exists() and list(tmp_path.glob(".aborted*")) == []
    writer = ResultWriter(aborted, id_to_did)
    writer.add("x.jpg", images[0][2])
    writer.abort()
    assert not aborted.exists() and list(tmp_path.glob(".aborted*")) == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.add("y.jpg", images[0][2])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2 copy keyword
def test_decoder_agrees_with_pycocotools() -> None:
    """Our run-length decoder against pycocotools' own, on masks with long runs, speckle and empty masks."""
    rng = np.random.default_rng(5)
    for trial in range(60):
        h, w = int(rng.integers(1, 120)), int(rng.integers(1, 120))
        mask = np.zeros((h, w), dtype=np.uint8)
        for _ in range(int(rng.integers(0, 4))):
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            mask[y : y + int(rng.integers(1, h + 1)), x : x + int(rng.integers(1, w + 1))] ^= 1
        if trial % 3 == 0:
            mask ^= (rng.random((h, w)) < 0.05).astype(np.uint8)
        label_map = np.where(mask == 1, 0, IGNORE).astype(np.uint8)
        entries = encode_label_map("m.jpg", label_map, {0: 1})
        expected = np.full((h, w), IGNORE, dtype=np.uint8)
        for e in entries:  # at most one segment here
            expected[mask_util.decode(dict(e["segmentation"])).astype(bool)] = 0
        decoded = decode_image("mem", "m.jpg", entries, {1: 0}) if entries else expected
        np.testing.assert_array_equal(decoded, expected)
        np.testing.assert_array_equal(decoded, label_map)


def test_result_file_errors(tmp_path: Path) -> None:
    id_to_did = dict(enumerate(DATASET_IDS))
    did_to_id = {d: i for i, d in id_to_did.items()}
    a = np.zeros((4, 5), dtype=np.uint8)
    entries = encode_label_map("a.jpg", a, id_to_did)

    overlap = tmp_path / "overlap.json"
    write_results(overlap, entries + [dict(entries[0], category_id=DATASET_IDS[1])])
    with pytest.raises(ValueError, match=r"overlap\.json.*'a\.jpg'.*category_id 1 and 2 overlap"):
        read_results(overlap, did_to_id)

    unknown = tmp_path / "unknown.json"
    write_results(unknown, [dict(entries[0], category_id=999)])
    with pytest.raises(ValueError, match=r"unknown\.json.*category_id 999"):
        read_results(unknown, did_to_id)

    bad_counts = tmp_path / "bad_counts.json"
    write_results(bad_counts, [dict(entries[0], segmentation={"size": [40, 50], "counts": "0"})])
    with pytest.raises(ValueError, match="do not cover"):
        read_results(bad_counts, did_to_id)

    not_list = tmp_path / "not_list.json"
    not_list.write_text('{"file_name": "a.jpg"}')
    with pytest.raises(ValueError, match=r"not_list\.json.*JSON list"):
        load_result_entries(not_list)

    no_size = tmp_path / "no_size.json"
    no_size.write_text(json.dumps([{"file_name": "a.jpg", "category_id": 1, "segmentation": {"counts": "x"}}]))
    with pytest.raises(ValueError, match=r"no_size\.json: entry 0"):
        load_result_entries(no_size)

    with pytest.raises(ValueError, match="not in the class table"):
        encode_label_map("a.jpg", np.full((2, 2), K, dtype=np.uint8), id_to_did)


# (d) the evaluate stage end to end ------------------------------------------------------------------------


def write_fixture(tmp_path: Path, images) -> tuple[Path, Path, Path, Path]:
    """Label PNGs, a class table, a split file and a result file for ``images``."""
    labels = tmp_path / "labels"
    labels.mkdir()
    for name, _, gt in images:
        Image.fromarray(gt).save(labels / f"{name}.png")
    table = ClassTable("toy", tuple(ClassInfo(i, f"class{i}", d) for i, d in enumerate(DATASET_IDS)))
    classes = tmp_path / "classes.yaml"
    table.save(classes)
    split = tmp_path / "split1.yaml"
    write_yaml(split, {"dataset": "toy", "name": "split1", "num_classes": K, "base_ids": BASE, "novel_ids": NOVEL})
    predictions = tmp_path / "predictions.json"
    entries = []
    for name, pred, _ in images:
        entries += encode_label_map(f"images/test/{name}.jpg", pred, table.id_to_dataset_id())
    write_results(predictions, entries)
    return labels, classes, split, predictions


def test_evaluate_result_file_end_to_end(tmp_path: Path) -> None:
    images = make_images()
    labels, classes, split, predictions = write_fixture(tmp_path, images)
    out = tmp_path / "metrics" / "split1.json"
    result = evaluate_result_file(predictions, labels_dir=labels, classes=classes, split=split, out=out)

    expected = reference_metrics(images)
    keys = ["mIoU", "fwIoU", "mACC", "pACC", "base_mIoU", "novel_mIoU", "hIoU", "base_mACC", "novel_mACC"]
    assert_close(result, expected, keys)
    assert result["num_images"] == len(images) and result["split"] == "split1"
    assert [c["split"] for c in result["per_class"]] == ["novel" if i in NOVEL else "base" for i in range(K)]
    assert_close(
        {"IoU": [c["IoU"] for c in result["per_class"]], "ACC": [c["ACC"] for c in result["per_class"]]},
        {"IoU": expected["per_class_IoU"], "ACC": expected["per_class_ACC"]},
        ["IoU", "ACC"],
    )
    assert json.loads(out.read_text()) == result

    # The CLI stage writes the same file.
    cli_out = tmp_path / "cli.json"
    argv = ["evaluate", "--predictions", str(predictions), "--labels", str(labels), "--classes", str(classes)]
    assert cli_main(argv + ["--split", str(split), "--out", str(cli_out)]) == 0
    assert json.loads(cli_out.read_text()) == result

    # Without a split file the base/novel summaries are absent (None) but the rest is the same.
    plain = evaluate_result_file(predictions, labels_dir=labels, classes=classes, out=tmp_path / "plain.json")
    assert plain["hIoU"] is None and plain["split"] is None
    assert plain["mIoU"] == result["mIoU"]


# (e) clear errors -----------------------------------------------------------------------------------------


def test_evaluate_errors(tmp_path: Path) -> None:
    images = make_images(n=4)
    labels, classes, split, predictions = write_fixture(tmp_path, images)
    table = ClassTable.load(classes)
    id_to_did = table.id_to_dataset_id()
    out = tmp_path / "out.json"

    def run(pred_entries: list[dict], split_path: Path | None = split) -> None:
        path = tmp_path / "case.json"
        write_results(path, pred_entries)
        evaluate_result_file(path, labels_dir=labels, classes=classes, split=split_path, out=out)

    def entries_for(imgs) -> list[dict]:
        return [e for name, pred, _ in imgs for e in encode_label_map(f"{name}.jpg", pred, id_to_did)]

    # A prediction at the wrong resolution names the image.
    name0, pred0, _ = images[0]
    wrong = np.zeros((pred0.shape[0] + 1, pred0.shape[1]), dtype=np.uint8)
    with pytest.raises(ValueError, match=rf"'{name0}'.*original resolution"):
        run(encode_label_map(f"{name0}.jpg", wrong, id_to_did) + entries_for(images[1:]))

    # A label without a prediction, and a prediction without a label.
    with pytest.raises(ValueError, match=rf"no prediction for 1 of the 4 labels.*'{images[-1][0]}'"):
        run(entries_for(images[:-1]))
    with pytest.raises(ValueError, match=r"no label.*'stray\.jpg'"):
        run(entries_for(images) + encode_label_map("stray.jpg", pred0, id_to_did))

    # A category id the class table does not know.
    bad = entries_for(images)
    bad[0] = dict(bad[0], category_id=4)
    with pytest.raises(ValueError, match="category_id 4 is not a dataset id"):
        run(bad)

    # A ground-truth value outside 0..K-1 and not 255 names the label file.
    gt = images[1][2].copy()
    gt[0, 0] = K
    Image.fromarray(gt).save(labels / f"{images[1][0]}.png")
    with pytest.raises(ValueError, match=rf"{images[1][0]}\.png.*ground truth holds {K}"):
        run(entries_for(images))

    # Split files with overlapping or out-of-range ids.
    overlapping = tmp_path / "overlap.yaml"
    write_yaml(overlapping, {"name": "s", "base_ids": [0, 1, 2], "novel_ids": [2, 3]})
    with pytest.raises(ValueError, match=r"overlap\.yaml.*\[2\] are both"):
        run(entries_for(images), overlapping)
    out_of_range = tmp_path / "range.yaml"
    write_yaml(out_of_range, {"name": "s", "base_ids": [0, 1], "novel_ids": [K]})
    with pytest.raises(ValueError, match=r"range\.yaml.*'novel_ids' holds \[7\]"):
        run(entries_for(images), out_of_range)
    assert not out.exists()


def test_metric_value_errors() -> None:
    metric = SemSegMetric(K)
    with pytest.raises(ValueError, match=f"ground truth holds {K}"):
        metric.update(np.zeros((2, 2), np.uint8), np.full((2, 2), K, np.uint8))
    with pytest.raises(ValueError, match="prediction holds 255"):
        metric.update(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        metric.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(TypeError, match="integer"):
        metric.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="novel_ids"):
        metric.compute(base_ids=[0], novel_ids=[K])
    assert metric.num_pixels == 0  # failed updates add nothing


# (f) CUDA equals CPU --------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    images = make_images(seed=4)
    cpu = metric_of(images, "cpu")
    cuda = SemSegMetric(K, device="cuda")
    for _, pred, gt in images:
        cuda.update(torch.from_numpy(pred).cuda(), torch.from_numpy(gt).cuda())
    assert cuda.confusion.device.type == "cuda"
    assert torch.equal(cuda.confusion.cpu(), cpu.confusion)
    assert cuda.compute(BASE, NOVEL) == cpu.compute(BASE, NOVEL)
    # Numpy input and merging across devices work too.
    mixed = SemSegMetric(K, device="cuda")
    mixed.update(images[0][1], images[0][2])
    assert torch.equal(SemSegMetric(K).merge(mixed).confusion, metric_of(images[:1]).confusion)
    assert not math.isnan(cuda.compute()["mIoU"])
