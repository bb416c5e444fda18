"""Tests of the Hungarian matcher, the set criterion and the complementary loss (weakshot.losses)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from weakshot.config import LossConfig, ModelConfig
from weakshot.losses import (
    HungarianMatcher,
    SetCriterion,
    build_criterion,
    complementary_target,
    dice_loss,
    nearest_downsample,
    sigmoid_focal_loss,
    total_loss,
)

K = 4  # classes; logits have K + 1 columns


def make_target(labels: list[int], masks: torch.Tensor, has_mask: list[bool]) -> dict[str, torch.Tensor]:
    has = torch.tensor(has_mask, dtype=torch.bool)
    masks = masks.bool() & has[:, None, None]  # mask-less targets carry an all-False mask
    return {"labels": torch.tensor(labels, dtype=torch.long), "masks": masks, "has_mask": has}


def random_targets(gen: torch.Generator, n: int, has_mask: list[bool], size: int) -> dict[str, torch.Tensor]:
    labels = torch.randperm(K, generator=gen)[:n].tolist()
    masks = torch.rand(n, size, size, generator=gen) > 0.5
    return make_target(labels, masks, has_mask)


def make_batch(targets: list[dict], size: int, pad_mask: torch.Tensor | None = None) -> dict:
    if pad_mask is None:
        pad_mask = torch.zeros(len(targets), size, size, dtype=torch.bool)
    return {"targets": targets, "pad_mask": pad_mask}


# ---------------------------------------------------------------- per-pixel reference formulas (scalar math)


def focal_pixel(x: float, t: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


def brute_cost(logits: torch.Tensor, masks: torch.Tensor, target: dict, cfg: LossConfig) -> list[list[float]]:
    """Cost[q][t] from the definition, pixel by pixel (masks already at the prediction resolution)."""
    prob = logits.softmax(-1)
    tmasks = nearest_downsample(target["masks"], masks.shape[-2:]).float()
    cost = []
    for q in range(logits.shape[0]):
        row = []
        for t in range(len(target["labels"])):
            c = -cfg.cost_class * prob[q, target["labels"][t]].item()
            if target["has_mask"][t]:
                xs, ts = masks[q].flatten().tolist(), tmasks[t].flatten().tolist()
                focal = sum(focal_pixel(x, y) for x, y in zip(xs, ts)) / len(xs)
                ps = [1 / (1 + math.exp(-x)) for x in xs]
                dice = 1 - (2 * sum(p * y for p, y in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)
                c += cfg.cost_focal * focal + cfg.cost_dice * dice
            row.append(c)
        cost.append(row)
    return cost


# ---------------------------------------------------------------- matcher


def test_nearest_downsample_matches_interpolate() -> None:
    masks = torch.rand(3, 16, 24) > 0.5
    for size in [(4, 6), (8, 8), (5, 7)]:  # integer ratios (strided view) and a non-integer one
        expected = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].bool()
        assert torch.equal(nearest_downsample(masks, size), expected)


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cfg = LossConfig()
    matcher = HungarianMatcher.from_config(cfg)
    num_queries, size, stride = 5, 8, 2
    patterns = [[True, True, False], [False, False], [True], [True, False, False]]
    targets = [random_targets(gen, len(p), p, size) for p in patterns]
    outputs = {
        "pred_logits": torch.randn(len(targets), num_queries, K + 1, generator=gen) * 2,
        "pred_masks": torch.randn(len(targets), num_queries, size // stride, size // stride, generator=gen) * 3,
    }
    indices = matcher(outputs, targets)
    for b, target in enumerate(targets):
        cost = brute_cost(outputs["pred_logits"][b], outputs["pred_masks"][b], target, cfg)
        n = len(target["labels"])
        # Every injection target -> query; the optimum is unique for continuous random costs.
        best = min(
            itertools.permutations(range(num_queries), n), key=lambda qs: sum(cost[q][t] for t, q in enumerate(qs))
        )
        query, tgt = indices[b]
        assert sorted(zip(tgt.tolist(), query.tolist())) == list(enumerate(best))
        assert query.dtype == tgt.dtype == torch.long


def test_matcher_mask_less_targets_use_class_cost_only() -> None:
    # Query 0 predicts the class confidently but an empty mask; query 1 is unsure but its mask is "empty-like"
    # too. With the class cost only, the novel target must go to the confident query regardless of masks.
    matcher = HungarianMatcher()
    logits = torch.tensor([[[5.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0]]])
    masks = torch.tensor([[[[10.0, 10.0]], [[-10.0, -10.0]]]])  # query 0 "fills" the image, query 1 is empty
    target = make_target([0], torch.zeros(1, 1, 2), [False])
    ((query, tgt),) = matcher({"pred_logits": logits, "pred_masks": masks}, [target])
    assert query.tolist() == [0] and tgt.tolist() == [0]
    costs = matcher.cost_matrices(logits, masks, [target])
    assert torch.allclose(costs[0, :, 0], -logits[0].softmax(-1)[:, 0])


def test_matcher_zero_targets() -> None:
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(2, 4, K + 1), "pred_masks": torch.randn(2, 4, 4, 4)}
    empty = make_target([], torch.zeros(0, 8, 8), [])
    one = make_target([2], torch.ones(1, 8, 8), [True])
    for targets in ([empty, empty], [empty, one]):
        indices = matcher(outputs, targets)
        assert [len(q) for q, _ in indices] == [len(t["labels"]) for t in targets]
        assert indices[0][0].dtype == torch.long


def test_match_layers_equals_per_layer_matching() -> None:
    gen = torch.Generator().manual_seed(3)
    matcher = HungarianMatcher()
    targets = [random_targets(gen, 3, [True, True, False], 8), random_targets(gen, 2, [True, False], 8)]
    layers = [
        {"pred_logits": torch.randn(2, 6, K + 1, generator=gen), "pred_masks": torch.randn(2, 6, 4, 4, generator=gen)}
        for _ in range(3)
    ]
    joint = matcher.match_layers(layers, targets)
    for layer, got in zip(layers, joint):
        for (q1, t1), (q2, t2) in zip(matcher(layer, targets), got):
            assert torch.equal(q1, q2) and torch.equal(t1, t2)


def test_matcher_rejects_non_finite_costs() -> None:
    outputs = {"pred_logits": torch.full((1, 2, K + 1), float("nan")), "pred_masks": torch.zeros(1, 2, 2, 2)}
    with pytest.raises(FloatingPointError):
        HungarianMatcher()(outputs, [make_target([1], torch.ones(1, 2, 2), [True])])


# ---------------------------------------------------------------- focal / dice known values


def test_focal_and_dice_known_values() -> None:
    logits = torch.zeros(1, 2)  # sigmoid 0.5 everywhere
    targets = torch.tensor([[1.0, 0.0]])
    # target 1: 0.25 * 0.5^2 * log 2; target 0: 0.75 * 0.5^2 * log 2; mean over the 2 pixels.
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(0.125 * math.log(2))
    assert dice_loss(logits, targets).item() == pytest.approx(1 - 2 / 3)  # 1 - (2*0.5 + 1) / (1 + 1 + 1)
    x = torch.tensor([[2.0, -1.0, 0.5]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    expected = sum(focal_pixel(a, b) for a, b in zip(x[0].tolist(), t[0].tolist())) / 3
    assert sigmoid_focal_loss(x, t).item() == pytest.approx(expected, rel=1e-6)
    perfect = torch.tensor([[50.0, -50.0]])  # confident and right: dice (2+1)/(1+1+1) = 0
    assert dice_loss(perfect, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- criterion


def criterion_for(deep_supervision: bool = False, num_aux_layers: int = 0, **cfg) -> SetCriterion:
    loss_cfg = LossConfig(**cfg)
    return SetCriterion(
        K, HungarianMatcher.from_config(loss_cfg), loss_cfg, deep_supervision, num_aux_layers=num_aux_layers
    )


def test_class_loss_uses_no_object_weight() -> None:
    criterion = criterion_for()
    logits = torch.tensor([[[2.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 1.0]]])
    masks = torch.zeros(1, 2, 2, 2)
    target = make_target([0], torch.zeros(1, 2, 2), [False])  # matched to query 0 (class cost only)
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, make_batch([target], 2))
    assert criterion.last_indices[0][0].tolist() == [0]
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 4))  # query 0, class 0, weight 1
    ce1 = -math.log(math.e / (math.e + 4))  # query 1, no-object, weight 0.1
    assert losses["loss_ce"].item() == pytest.approx((ce0 + 0.1 * ce1) / 1.1, rel=1e-6)
    # A mask-less target: no mask loss at all, num_masks clamped to 1.
    assert losses["loss_focal"].item() == 0 and losses["loss_dice"].item() == 0


def test_mask_losses_known_value_with_upsampling() -> None:
    criterion = criterion_for()
    size = 4
    pred_masks = torch.full((1, 3, 2, 2), -5.0)  # constant logits: bilinear upsampling keeps them constant
    pred_masks[0, 1] = 1.5  # the best mask for the base target (and the confident class)
    logits = torch.zeros(1, 3, K + 1)
    logits[0, 1, 2] = 10.0  # query 1 claims class 2
    logits[0, 2, 3] = 10.0  # query 2 claims class 3
    gt = torch.zeros(2, size, size)
    gt[0, :2] = 1  # base class 2 covers the top half
    target = make_target([2, 3], gt, [True, False])
    losses = criterion({"pred_logits": logits, "pred_masks": pred_masks}, make_batch([target], size))
    q, t = criterion.last_indices[0]
    assert dict(zip(t.tolist(), q.tolist())) == {0: 1, 1: 2}
    expected_focal = 0.5 * focal_pixel(1.5, 1) + 0.5 * focal_pixel(1.5, 0)  # num_masks = 1 (one base target)
    p = 1 / (1 + math.exp(-1.5))
    expected_dice = 1 - (2 * 8 * p + 1) / (16 * p + 8 + 1)
    assert losses["loss_focal"].item() == pytest.approx(expected_focal, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(expected_dice, rel=1e-5)


def test_mask_losses_use_bilinear_upsampled_predictions() -> None:
    gen = torch.Generator().manual_seed(4)
    criterion = criterion_for()
    targets = [random_targets(gen, 2, [True, True], 8)]
    outputs = {
        "pred_logits": torch.randn(1, 3, K + 1, generator=gen),
        "pred_masks": torch.randn(1, 3, 2, 2, generator=gen),
    }
    losses = criterion(outputs, make_batch(targets, 8))
    q, t = criterion.last_indices[0]
    up = F.interpolate(outputs["pred_masks"][0, q][:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    gt = targets[0]["masks"][t].float()
    assert losses["loss_focal"].item() == pytest.approx(sigmoid_focal_loss(up, gt).sum().item() / 2, rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(dice_loss(up, gt).sum().item() / 2, rel=1e-6)


def test_unlabelled_pixels_leave_the_mask_losses_only_when_asked() -> None:
    """Retraining on pseudo-labels (``loss.mask_ignore_unlabelled``): pixels labelled 255 are no negative of any
    mask, so the mask losses are those of the labelled pixels alone and the 255 pixels get no mask gradient.
    By default (MaskFormer) they are negatives of every mask."""
    gen = torch.Generator().manual_seed(7)
    gt = torch.zeros(1, 4, 4)
    gt[0, :2, :2] = 1  # class 2 in the top-left corner
    labels = torch.full((1, 4, 4), 1, dtype=torch.uint8)  # class 1 (no target here: only its label) ...
    labels[0, :2, :2] = 2
    labels[0, 2:] = 255  # ... and an unlabelled bottom half
    batch = make_batch([make_target([2], gt, [True])], 4)
    batch["labels"] = labels
    for ignore in (True, False):
        pred_masks = torch.randn(1, 3, 4, 4, generator=gen).requires_grad_()
        logits = torch.zeros(1, 3, K + 1)
        criterion = criterion_for(mask_ignore_unlabelled=ignore)
        losses = criterion({"pred_logits": logits, "pred_masks": pred_masks}, batch)
        (losses["loss_focal"] + losses["loss_dice"]).backward()
        (q,), _ = criterion.last_indices[0]
        grad = pred_masks.grad[0, q]
        assert grad[:2].abs().min() > 0  # the labelled pixels are trained either way
        if ignore:
            top, target = pred_masks[0, q, :2].detach()[None], gt[0, :2][None]
            assert losses["loss_focal"].item() == pytest.approx(sigmoid_focal_loss(top, target).item(), rel=1e-6)
            assert losses["loss_dice"].item() == pytest.approx(dice_loss(top, target).item(), rel=1e-6)
            assert torch.all(grad[2:] == 0)
        else:
            assert grad[2:].abs().min() > 0


def test_normalisers_count_base_masks_weighted_queries_and_go_through_the_share_hook() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = [random_targets(gen, 3, [True, True, False], 8), random_targets(gen, 1, [True], 8)]
    outputs = {
        "pred_logits": torch.randn(2, 5, K + 1, generator=gen),
        "pred_masks": torch.randn(2, 5, 4, 4, generator=gen),
    }
    criterion = criterion_for()
    plain = criterion(outputs, make_batch(targets, 8))
    # With no hook the class loss is F.cross_entropy's weighted mean over all queries.
    target_classes = torch.full((2, 5), K)
    for b, (q, t) in enumerate(criterion.last_indices):
        target_classes[b, q] = targets[b]["labels"][t]
    expected_ce = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), target_classes, weight=criterion.empty_weight)
    assert plain["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)

    seen = []

    def share(counts: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        seen.append(counts.tolist())
        return torch.maximum(counts, minimum) * 2  # stands for a global count twice this rank's share

    criterion.count_share = share
    shared = criterion(outputs, make_batch(targets, 8))
    # masks: the mask-less target is not counted; queries: 4 matched weigh 1, 6 unmatched 0.1; images with a
    # novel target: 1.
    assert seen[0] == pytest.approx([3.0, 4 + 0.1 * 6, 1.0])
    for name in ("loss_focal", "loss_dice", "loss_ce"):
        assert shared[name].item() == pytest.approx(plain[name].item() / 2)


def test_novel_targets_get_class_gradient_but_no_mask_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    criterion = criterion_for()
    targets = [random_targets(gen, 3, [True, True, False], 8)]
    logits = torch.randn(1, 6, K + 1, generator=gen).requires_grad_()
    masks = torch.randn(1, 6, 4, 4, generator=gen).requires_grad_()
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, make_batch(targets, 8))
    query_of = {t: q for q, t in zip(*[x.tolist() for x in criterion.last_indices[0]])}
    (losses["loss_focal"] + losses["loss_dice"]).backward(retain_graph=True)
    assert torch.all(masks.grad[0, query_of[2]] == 0)  # the novel target's query: exactly no mask gradient
    assert masks.grad[0, query_of[0]].abs().sum() > 0 and masks.grad[0, query_of[1]].abs().sum() > 0
    unmatched = sorted(set(range(6)) - set(query_of.values()))
    assert torch.all(masks.grad[0, unmatched] == 0)
    losses["loss_ce"].backward()
    assert logits.grad[0, query_of[2]].abs().sum() > 0  # ... but it is taught its (novel) class
    assert logits.grad[0, query_of[2], targets[0]["labels"][2]] < 0  # pushes the novel class up


def test_zero_targets_in_criterion() -> None:
    criterion = criterion_for(complementary_weight=0.2)
    empty = make_target([], torch.zeros(0, 8, 8), [])
    logits = torch.randn(2, 4, K + 1, requires_grad=True)
    masks = torch.randn(2, 4, 4, 4, requires_grad=True)
    losses = criterion({"pred_logits": logits, "pred_masks": masks}, make_batch([empty, empty], 8))
    # Every query is no-object, so all of them get the (uniformly weighted) class loss.
    expected = F.cross_entropy(logits.transpose(1, 2), torch.full((2, 4), K))
    assert losses["loss_ce"].item() == pytest.approx(expected.item())
    assert losses["loss_focal"].item() == losses["loss_dice"].item() == losses["loss_comp"].item() == 0
    total_loss(losses, criterion.weight_dict).backward()
    assert torch.all(masks.grad == 0)


# ---------------------------------------------------------------- complementary loss


def test_complementary_target_zero_on_base_and_padding() -> None:
    size = 4
    base = torch.zeros(1, size, size, dtype=torch.bool)
    base[0, 0, :] = True  # base class on row 0
    novel_mask = torch.zeros(1, size, size)
    target = make_target([1, 3], torch.cat([base.float(), novel_mask]), [True, False])
    pad = torch.zeros(1, size, size, dtype=torch.bool)
    pad[0, :, -1] = True  # padding in the last column
    comp = complementary_target([target], pad)
    expected = torch.ones(1, size, size)
    expected[0, 0, :] = 0
    expected[0, :, -1] = 0
    assert torch.equal(comp, expected)


def comp_case(floor: float = -2.9444) -> tuple[SetCriterion, dict, dict, torch.Tensor, dict[int, int]]:
    """Image 0: base class 1 (rows 0-1), novel class 3; image 1: base class 2 only (no novel target)."""
    size, num_queries = 4, 4
    criterion = criterion_for(complementary_weight=0.15, complementary_floor=floor)
    logits = torch.full((2, num_queries, K + 1), -5.0)
    logits[0, 0, 1] = logits[0, 1, 3] = logits[1, 2, 2] = 5.0  # q0 -> base 1, q1 -> novel 3, q2 -> base 2
    masks = torch.zeros(2, num_queries, size, size)  # prediction at full resolution: no interpolation blur
    masks[0, 1] = torch.tensor([[3.0, -6, 1, -8], [2, 0.5, -7, 4], [1, 2, -9, 3], [0, 1, 2, -4]])
    masks[0, 0] = masks[1, 2] = -6.0
    masks[0, 0, :2] = 6.0  # q0 predicts its base mask (rows 0-1) ...
    masks[1, 2, 3] = 6.0  # ... and q2 its (row 3), so the matching is unambiguous
    base0 = torch.zeros(2, size, size)
    base0[0, :2] = 1
    base1 = torch.zeros(1, size, size)
    base1[0, 3] = 1
    targets = [make_target([1, 3], base0, [True, False]), make_target([2], base1, [True])]
    pad = torch.zeros(2, size, size, dtype=torch.bool)
    pad[0, 3, :] = True  # padding on the last row of image 0
    batch = make_batch(targets, size, pad)
    outputs = {"pred_logits": logits, "pred_masks": masks.requires_grad_()}
    return criterion, outputs, batch, masks, {"base0": 0, "novel0": 1, "base1": 2}


def test_complementary_loss_value_gradient_and_floor() -> None:
    floor = -2.9444
    criterion, outputs, batch, masks, q = comp_case(floor)
    losses = criterion(outputs, batch)
    assert [x.tolist() for x in criterion.last_indices[0]] == [[0, 1], [0, 1]]

    # By hand: image 0 only (image 1 has no novel target, so the mean is over one image).
    union = masks[0, 1].detach().clamp(min=floor)
    comp_t = torch.ones(4, 4)
    comp_t[:2] = 0  # base pixels
    comp_t[3] = 0  # padding
    cfg = criterion.cfg
    expected = cfg.focal_weight * sigmoid_focal_loss(union[None], comp_t[None]) + cfg.dice_weight * dice_loss(
        union[None], comp_t[None]
    )
    assert losses["loss_comp"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert criterion.weight_dict["loss_comp"] == 0.15  # the focal/dice weights live inside the loss

    losses["loss_comp"].backward()
    grad = masks.grad
    assert torch.all(grad[0, q["base0"]] == 0) and torch.all(grad[1] == 0)  # base / no-novel image: none
    assert torch.all(grad[0, [2, 3]] == 0)  # unmatched queries: none
    novel_grad = grad[0, q["novel0"]]
    below = masks[0, 1].detach() < floor
    assert below.any() and torch.all(novel_grad[below] == 0)  # the floor wins there: no gradient
    assert torch.all(novel_grad[~below] != 0)


def test_complementary_loss_without_novel_targets_is_zero_with_graph() -> None:
    criterion = criterion_for(complementary_weight=0.2)
    target = make_target([1], torch.ones(1, 4, 4), [True])
    outputs = {"pred_logits": torch.randn(1, 3, K + 1), "pred_masks": torch.randn(1, 3, 2, 2, requires_grad=True)}
    losses = criterion(outputs, make_batch([target], 4))
    assert losses["loss_comp"].item() == 0 and losses["loss_comp"].requires_grad
    losses["loss_comp"].backward()
    assert torch.all(outputs["pred_masks"].grad == 0)


def test_complementary_loss_off_when_weight_zero() -> None:
    criterion, outputs, batch, _, _ = comp_case()
    off = criterion_for(complementary_weight=0.0)
    assert "loss_comp" not in off(outputs, batch) and "loss_comp" not in off.weight_dict
    assert "loss_comp" in criterion(outputs, batch)


# ---------------------------------------------------------------- deep supervision, weights, total


def test_aux_losses_keys_and_weight_dict() -> None:
    gen = torch.Generator().manual_seed(2)
    criterion = criterion_for(deep_supervision=True, num_aux_layers=2, complementary_weight=0.15)
    targets = [random_targets(gen, 2, [True, False], 8)]

    def layer() -> dict:
        return {
            "pred_logits": torch.randn(1, 5, K + 1, generator=gen),
            "pred_masks": torch.randn(1, 5, 4, 4, generator=gen),
        }

    aux = [layer(), layer()]
    outputs = {**layer(), "aux_outputs": aux}
    losses = criterion(outputs, make_batch(targets, 8))
    names = ["loss_ce", "loss_focal", "loss_dice", "loss_comp"]
    assert set(losses) == {n + s for n in names for s in ["", "_0", "_1"]}
    assert set(criterion.weight_dict) == set(losses)
    assert criterion.weight_dict["loss_focal_1"] == 20.0 and criterion.weight_dict["loss_comp_0"] == 0.15
    # Aux layer 0's losses are those of a criterion applied to that layer alone.
    alone = criterion_for(complementary_weight=0.15)(aux[0], make_batch(targets, 8))
    for n in names:
        assert losses[n + "_0"].item() == pytest.approx(alone[n].item(), rel=1e-6)
    with pytest.raises(ValueError, match="aux outputs"):
        criterion({**layer(), "aux_outputs": aux[:1]}, make_batch(targets, 8))
    # Without deep supervision, aux outputs are ignored.
    assert set(criterion_for()(outputs, make_batch(targets, 8))) == {"loss_ce", "loss_focal", "loss_dice"}


def test_total_loss_and_build_criterion() -> None:
    losses = {"loss_ce": torch.tensor(2.0), "loss_focal": torch.tensor(0.5), "loss_debug": torch.tensor(100.0)}
    assert total_loss(losses, {"loss_ce": 1.0, "loss_focal": 20.0}).item() == pytest.approx(12.0)
    with pytest.raises(ValueError):
        total_loss({"loss_debug": torch.tensor(1.0)}, {"loss_ce": 1.0})
    criterion = build_criterion(K, ModelConfig(dec_layers=6), LossConfig(complementary_weight=0.2))
    assert criterion.num_aux_layers == 5 and len(criterion.weight_dict) == 4 * 6
    assert criterion.empty_weight.tolist() == [1.0] * K + [pytest.approx(0.1)]
