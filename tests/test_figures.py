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


def test_every_class_name_of_the_key_fits_inside_the_figure(dataset, tmp_path, monkeypatch):
    """Predictions that use every class of the dataset: the class key wraps into as many rows as it needs, and
    no legend reaches past the figure's edges (the names would be cut off in the PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from weakshot.data.classes import ClassTable
    from weakshot.evaluation.results import ResultWriter
    from weakshot.reporting.figures import write_figure

    table = ClassTable.load(dataset["prepared"] / "classes.yaml")
    predictions = {}
    for shift, label in enumerate(["A", "B", "C"]):
        predictions[label] = tmp_path / f"{label}.json"
        with ResultWriter(predictions[label], table.id_to_dataset_id()) as writer:
            for png in sorted((dataset["prepared"] / "labels" / "test").glob("*.png")):
                every_class = (np.arange(32 * 32).reshape(32, 32) + shift) % table.num_classes
                writer.add(png.stem, every_class.astype(np.uint8))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to measure it
    write_figure(dataset["prepared"], dataset["split"], predictions, tmp_path / "figure.png", rows=2)
    (figure,) = figures
    renderer = figure.canvas.get_renderer()
    page = figure.bbox
    legends = figure.legends
    assert len(legends) == 2 and len(legends[1].get_texts()) == table.num_classes
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, box
    assert (tmp_path / "figure.png").stat().st_size > 0
