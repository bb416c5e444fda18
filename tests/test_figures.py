"""Figure rows are picked by a rule: largest disagreement of the methods on novel pixels, images without novel
pixels never; the split map colours base red and novel blue."""

import numpy as np

from weakshot.reporting.figures import SPLIT_COLOURS, pick_rows, split_map, split_overlay

NOVEL = [5]


def test_rows_are_the_images_where_methods_disagree_most():
    gt = {
        "agree": np.array([[5, 5], [1, 1]]),
        "disagree": np.array([[5, 5], [1, 255]]),
        "no_novel": np.array([[1, 2], [1, 2]]),
        "small": np.array([[5, 1, 1, 1, 1, 1]]),  # novel under 20 % of the labelled pixels
    }
    right = {name: label.copy() for name, label in gt.items()}
    wrong = {name: np.where(label == 5, 0, label) for name, label in gt.items()}
    predictions = {"A": right, "B": {**right, "disagree": wrong["disagree"], "small": wrong["small"]}}
    assert pick_rows(gt, predictions, NOVEL, count=2) == ["disagree", "agree"]
    assert pick_rows(gt, predictions, NOVEL, count=5) == ["disagree", "agree", "small"]


def test_split_map_colours():
    out = split_map(np.array([[5, 1, 255]]), NOVEL)
    assert tuple(out[0, 0]) == SPLIT_COLOURS["novel"] and tuple(out[0, 1]) == SPLIT_COLOURS["base"]
    assert tuple(out[0, 2]) == (0, 0, 0)


def test_split_overlay_tints_the_grey_input():
    """Base pixels read red and novel pixels blue whatever the image; the image's texture still shows."""
    gt = np.array([[0, 1], [255, 0]])
    image = np.array([[[250, 250, 250], [10, 10, 10]], [[120, 120, 120], [10, 10, 10]]], dtype=np.uint8)
    out = split_overlay(image, gt, novel_ids=[1]).astype(int)
    assert out[0, 0, 0] > out[0, 0, 2] and out[0, 1, 2] > out[0, 1, 0]  # base reddish, novel bluish
    assert out[0, 0, 0] > out[1, 1, 0]  # the same (base) tint on a bright and a dark pixel differs: texture
    assert (out[1, 0] == out[1, 0, 0]).all()  # unlabelled: grey only
