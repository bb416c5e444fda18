"""Pseudo-labels: ground-truth base pixels are kept exactly, only novel classes named by the image-level labels
appear, the quality report matches a hand count, and a retrain reads the PNGs."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import inputs, tiny_run

from weakshot.data.splits import load_split, read_split_image_labels
from weakshot.engine.train import TrainInputs, train
from weakshot.methods.pseudo_labels import PseudoLabelQuality, pseudo_label, write_pseudo_labels

BASE, NOVEL = [0, 1, 2], [3, 4]


def test_pseudo_label_keeps_base_gt_and_only_present_novel_classes():
    gt = np.array([[0, 0, 3, 3], [1, 255, 4, 4], [2, 2, 3, 255]], dtype=np.uint8)
    prediction = np.array([[3, 1, 3, 4], [4, 3, 2, 4], [3, 2, 0, 3]], dtype=np.uint8)
    out = pseudo_label(prediction, gt, BASE, present_novel_ids=[3])
    base = np.isin(gt, BASE)
    assert (out[base] == gt[base]).all()  # base GT wins over any prediction
    # Outside the base masks: the present novel class where predicted, 255 for an absent novel class (4) and for
    # base predictions (2 at (1, 2); 0 at (2, 2)).
    expected = np.array([[0, 0, 3, 255], [1, 3, 255, 255], [2, 2, 255, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert 4 not in out


def test_pseudo_label_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        pseudo_label(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), BASE, [3])


def test_quality_counts_unlabelled_pixels_as_misses():
    gt = np.array([[3, 3, 3, 4], [4, 0, 255, 1]], dtype=np.uint8)
    pseudo = np.array([[3, 3, 255, 3], [255, 0, 3, 1]], dtype=np.uint8)
    quality = PseudoLabelQuality(num_classes=5, novel_ids=NOVEL)
    quality.update(pseudo, gt)
    report = quality.compute()
    # Class 3: TP 2, FP 1 (the GT-4 pixel; the GT-255 pixel is not scored), FN 1 -> 2/4. Class 4: TP 0 -> 0.
    assert report["per_class_IoU"] == {3: 50.0, 4: 0.0}
    assert report["novel_mIoU"] == 25.0
    assert report["novel_precision"] == pytest.approx(100 * 2 / 3)
    assert report["novel_recall"] == pytest.approx(100 * 2 / 5)
    assert report["labelled_fraction"] == pytest.approx(100 * 5 / 7)


def test_written_pseudo_labels_respect_the_split_and_feed_a_retrain(dataset, tmp_path):
    weak = train(tiny_run(similarity={"pairing": "none"}, train={"iterations": 2}), inputs(dataset, tmp_path / "m"))
    out_dir, report = tmp_path / "pseudo", tmp_path / "pseudo.json"
    result = write_pseudo_labels(weak.parent, dataset["prepared"], dataset["split"], dataset["image_labels"],
                                 out_dir, report)  # fmt: skip
    record = load_split(dataset["split"])
    labels = read_split_image_labels(dataset["image_labels"])
    pngs = sorted(out_dir.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(labels) and result["num_images"] == len(pngs) == 12
    assert report.is_file() and not list(tmp_path.glob(".pseudo.*"))  # atomic: no leftover temp folder
    for png in pngs:
        pseudo = np.asarray(Image.open(png))
        gt = np.asarray(Image.open(dataset["prepared"] / "labels" / "train" / png.name))
        base = np.isin(gt, record["base_ids"])
        assert (pseudo[base] == gt[base]).all()
        outside = pseudo[~base]
        assert set(np.unique(outside)) <= set(labels[png.stem][1]) | {255}

    retrain = tiny_run(method={"supervision": "full"}, similarity={"pairing": "none"}, train={"iterations": 2})
    model = train(retrain, TrainInputs(dataset["prepared"], tmp_path / "retrain", pseudo_labels=out_dir))
    assert model.is_file()


def test_retraining_config_and_inputs_must_agree(dataset, tmp_path):
    named = tiny_run(method={"supervision": "full", "pseudo_labels": "cross_pair"}, similarity={"pairing": "none"})
    with pytest.raises(ValueError, match="--pseudo-labels"):
        train(named, TrainInputs(dataset["prepared"], tmp_path / "a"))
    weak = tiny_run(similarity={"pairing": "none"})
    with pytest.raises(ValueError, match="supervision 'full'"):
        train(weak, TrainInputs(dataset["prepared"], tmp_path / "b", split=dataset["split"],
                                image_labels=dataset["image_labels"], pseudo_labels=tmp_path))  # fmt: skip


def test_cam_label_map_picks_the_best_present_novel_class():
    from weakshot.methods.cam import cam_label_map

    cams = torch.zeros(5, 2, 3)
    cams[3] = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.0, -1.0]])
    cams[4] = torch.tensor([[0.0, 2.0, 0.0], [0.5, 0.0, -1.0]])  # relative to its own max: 0, 1, 0 / 0.25
    cams[0] = 10.0  # a base class: never chosen
    np.testing.assert_array_equal(cam_label_map(cams, [3, 4]), [[3, 4, 3], [4, 3, 3]])
    np.testing.assert_array_equal(cam_label_map(cams, [4], min_score=0.2), [[255, 4, 255], [4, 255, 255]])
    assert (cam_label_map(cams, []) == 255).all()


def test_cam_classifier_trains_and_labels_only_present_novel_classes(dataset, tmp_path):
    from weakshot.methods.cam import write_cam_pseudo_labels

    run = tiny_run(method={"supervision": "image"}, similarity={"pairing": "none"}, train={"iterations": 2})
    model = train(run, TrainInputs(dataset["prepared"], tmp_path / "cam"))
    with pytest.raises(ValueError, match="not a CAM classifier"):
        weak = train(tiny_run(similarity={"pairing": "none"}, train={"iterations": 1}), inputs(dataset, tmp_path / "w"))
        write_cam_pseudo_labels(weak.parent, dataset["prepared"], dataset["split"], dataset["image_labels"],
                                tmp_path / "x", tmp_path / "x.json")  # fmt: skip
    result = write_cam_pseudo_labels(model.parent, dataset["prepared"], dataset["split"], dataset["image_labels"],
                                     tmp_path / "cam_pl", tmp_path / "cam_pl.json")  # fmt: skip
    assert result["num_images"] == 12
    labels = read_split_image_labels(dataset["image_labels"])
    record = load_split(dataset["split"])
    for png in (tmp_path / "cam_pl").glob("*.png"):
        pseudo = np.asarray(Image.open(png))
        gt = np.asarray(Image.open(dataset["prepared"] / "labels" / "train" / png.name))
        base = np.isin(gt, record["base_ids"])
        assert (pseudo[base] == gt[base]).all()
        present = labels[png.stem][1]
        # Every non-base pixel gets a present novel class when there is one (min_score 0), else stays 255.
        assert set(np.unique(pseudo[~base])) <= (set(present) if present else {255})
