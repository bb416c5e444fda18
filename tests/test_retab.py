"""RETAB adapted: boundary targets from base masks, the affinity loss, the networks' training and the pseudo-labels
(base GT kept, only present novel classes)."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_run

from weakshot.data.splits import load_split, read_split_image_labels
from weakshot.engine.train import TrainInputs, train
from weakshot.losses.retab import RetabLoss, boundary_targets
from weakshot.methods.retab import retab_label_map, write_retab_pseudo_labels


def test_boundary_targets_mark_class_borders_and_skip_unknown_regions():
    labels = torch.tensor([[[1, 1, 1, 2, 2], [1, 1, 1, 2, 2], [255, 255, 255, 255, 255], [255, 255, 255, 255, 255]]])
    target = boundary_targets(labels)[0]
    assert target[0, 0] == 0 and target[0, 4] == 0  # inside class 1 and class 2
    assert (target[0, 2:4] == 1).all()  # the 1-2 border
    assert (target[1] == 1).all()  # next to unknown (255) pixels: a border of a base region
    assert (target[3] == -1).all()  # all-unknown neighbourhoods are not trained


def test_affinity_loss_pulls_same_class_pixels_together():
    labels = torch.tensor([[[0, 0, 1, 1]] * 4])
    loss = RetabLoss(radius=1)
    together = torch.zeros(1, 2, 4, 4)
    together[:, 0, :, 2:] = 20.0  # class 1 pixels far from class 0 pixels, identical within a class
    apart = torch.randn(1, 2, 4, 4)
    batch = {"labels": labels}
    good = loss({"affinity_features": together, "boundary_logits": torch.zeros(1, 4, 4)}, batch)
    bad = loss({"affinity_features": apart, "boundary_logits": torch.zeros(1, 4, 4)}, batch)
    assert good["loss_affinity"] < 0.01 < bad["loss_affinity"]
    novel = {"labels": torch.full((1, 4, 4), 255)}
    assert loss({"affinity_features": apart, "boundary_logits": torch.zeros(1, 4, 4)}, novel)["loss_affinity"] == 0


@pytest.mark.parametrize("radius", [1, 2, 5])
def test_affinity_loss_is_the_mean_over_every_ordered_pair_within_the_radius(radius):
    """The loss shifts the map against itself, one offset per unordered pair; brute force over both orders of
    every pair (an explicit double loop over pixels) gives the same value and gradient."""
    generator = torch.Generator().manual_seed(radius)
    features = torch.randn(2, 3, 6, 7, generator=generator, requires_grad=True)
    labels = torch.randint(0, 3, (2, 6, 7), generator=generator)
    labels[0, :2] = 255
    pos, neg = [], []
    for b in range(2):
        for y1, x1, y2, x2 in itertools.product(range(6), range(7), range(6), range(7)):
            first, second = labels[b, y1, x1], labels[b, y2, x2]
            if (y1, x1) == (y2, x2) or (y1 - y2) ** 2 + (x1 - x2) ** 2 > radius**2 or 255 in (first, second):
                continue
            affinity = torch.exp(-(features[b, :, y1, x1] - features[b, :, y2, x2]).abs().mean())
            (pos if first == second else neg).append(affinity)
    expected = 0.5 * -(torch.stack(pos) + 1e-5).log().mean() + 0.5 * -(1 - torch.stack(neg) + 1e-5).log().mean()
    outputs = {"affinity_features": features, "boundary_logits": torch.zeros(2, 6, 7)}
    got = RetabLoss(radius)(outputs, {"labels": labels})["loss_affinity"]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, features)[0], torch.autograd.grad(expected, features)[0])


def test_retab_label_map_keeps_present_classes_and_respects_a_boundary():
    cams = torch.zeros(4, 8, 8)
    cams[2, 2, 1] = 1.0  # a peak of class 2 on the left
    cams[3, 2, 6] = 1.0  # and of class 3 on the right
    features = torch.zeros(2, 8, 8)
    boundary = torch.zeros(8, 8)
    boundary[:, 4] = 1.0  # a vertical wall
    base = torch.zeros(8, 8, dtype=torch.bool)
    out = retab_label_map(cams, features, boundary, base, [2, 3], radius=2, log_t=4)
    assert set(np.unique(out)) == {2, 3}
    assert (out[:, :4] == 2).all() and (out[:, 5:] == 3).all()
    only_two = retab_label_map(cams, features, boundary, base, [2], radius=2, log_t=4)
    assert (only_two == 2).all()
    assert (retab_label_map(cams, features, boundary, base, [], radius=2) == 255).all()


def test_retab_networks_train_and_label_the_split(dataset, tmp_path):
    none = {"pairing": "none"}
    cam = train(tiny_run(method={"supervision": "image"}, similarity=none, train={"iterations": 2}),
                TrainInputs(dataset["prepared"], tmp_path / "cam"))  # fmt: skip
    retab_inputs = TrainInputs(dataset["prepared"], tmp_path / "retab", split=dataset["split"],
                               image_labels=dataset["image_labels"])  # fmt: skip
    retab = train(tiny_run(method={"supervision": "retab"}, similarity=none, loss={"affinity_radius": 2},
                           train={"iterations": 2}), retab_inputs)  # fmt: skip
    with pytest.raises(ValueError, match="not a RETAB network"):
        write_retab_pseudo_labels(cam.parent, cam.parent, dataset["prepared"], dataset["split"],
                                  dataset["image_labels"], tmp_path / "x", tmp_path / "x.json")  # fmt: skip
    result = write_retab_pseudo_labels(
        cam.parent, retab.parent, dataset["prepared"], dataset["split"], dataset["image_labels"],
        tmp_path / "pl", tmp_path / "pl.json", log_t=3,
    )  # fmt: skip
    assert result["num_images"] == 12
    record, labels = load_split(dataset["split"]), read_split_image_labels(dataset["image_labels"])
    for png in (tmp_path / "pl").glob("*.png"):
        pseudo = np.asarray(Image.open(png))
        gt = np.asarray(Image.open(dataset["prepared"] / "labels" / "train" / png.name))
        base = np.isin(gt, record["base_ids"])
        assert (pseudo[base] == gt[base]).all()
        assert set(np.unique(pseudo[~base])) <= set(labels[png.stem][1]) | {255}
