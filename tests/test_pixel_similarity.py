"""Pixel-pixel similarity transfer: point sampling, SimNet, balanced weights, SimLoss and DistLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weakshot.config import SimilarityConfig
from weakshot.losses import pixel_similarity
from weakshot.losses.pixel_similarity import (
    BalancedWeights,
    PixelSimilarityLoss,
    SimNet,
    distill_loss_map,
    gather_points,
    pair_grid,
    point_coords,
    sample_points,
)

NOVEL = (5, 6)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _targets(base: list[int], novel: list[int]) -> dict[str, torch.Tensor]:
    labels = torch.tensor(base + novel, dtype=torch.int64)
    has_mask = torch.tensor([True] * len(base) + [False] * len(novel))
    return {"labels": labels, "has_mask": has_mask, "masks": torch.zeros(len(labels), 1, 1, dtype=torch.bool)}


def _batch(labels: torch.Tensor, targets: list[dict], pairs: list[tuple[int, int]] | None, pad=None) -> dict:
    batch = {
        "labels": labels,
        "pad_mask": torch.zeros(labels.shape, dtype=torch.bool) if pad is None else pad,
        "targets": targets,
        "novel_ids": torch.tensor(NOVEL),
    }
    if pairs is not None:
        batch["pairs"] = torch.tensor(pairs)
    return batch


def _outputs(b: int, d: int, h: int, w: int, q: int = 4, k: int = 8, seed: int = 0):
    g = _generator(seed)
    mask_features = torch.randn(b, d, h, w, generator=g).requires_grad_()
    pred_logits = torch.randn(b, q, k + 1, generator=g).requires_grad_()
    pred_masks = torch.randn(b, q, h, w, generator=g).requires_grad_()
    return mask_features, pred_logits, pred_masks


def _mixed_case(seed: int = 0):
    """Two images (one cross pair) at stride 4: base classes 1 and 2, novel 5 in both, padding on the right."""
    h = w = 8
    labels = torch.full((2, 4 * h, 4 * w), 255)
    labels[:, :8] = 1
    labels[:, 8:16, :12] = 2
    pad = torch.zeros(labels.shape, dtype=torch.bool)
    pad[:, :, 28:] = True
    targets = [_targets([1, 2], [5]), _targets([1, 2], [5])]
    return _batch(labels, targets, [(0, 1)], pad), _outputs(2, 6, h, w, seed=seed)


# --- sample_points ---------------------------------------------------------------------------------------


def test_sample_points_uniform_inside_a_big_region() -> None:
    region = torch.zeros(3, 10, 12, dtype=torch.bool)
    region[:, 2:9, 1:11] = True  # 70 pixels
    index, coords = sample_points(region, 30, _generator())
    assert index.shape == (3, 30) and index.dtype == torch.int64
    assert coords.shape == (3, 30, 2)
    assert region.flatten(1).gather(1, index).all()
    for row in index:
        assert len(set(row.tolist())) == 30
    # Uniform inside: over many draws every region pixel is picked about 30/70 of the time.
    counts = torch.zeros(10 * 12)
    g = _generator(1)
    for _ in range(300):
        idx, _ = sample_points(region[:1], 30, g)
        counts[idx[0]] += 1
    inside = counts[region[0].flatten()] / 300
    assert counts[~region[0].flatten()].sum() == 0
    assert (inside - 30 / 70).abs().max() < 0.12


def test_sample_points_small_region_takes_all_then_outside() -> None:
    region = torch.zeros(2, 6, 6, dtype=torch.bool)
    region[0, 1, 1:4] = True  # 3 pixels
    region[1, 5, 5] = True  # 1 pixel
    index, _ = sample_points(region, 10, _generator())
    flat = region.flatten(1)
    for b, need in ((0, 3), (1, 1)):
        picked = flat[b, index[b]]
        assert picked.sum() == need  # every region pixel
        assert set(torch.nonzero(flat[b]).flatten().tolist()) <= set(index[b].tolist())
        assert len(set(index[b].tolist())) == 10  # topped up with distinct outside pixels
    with pytest.raises(ValueError):
        sample_points(region, 37)


def test_coords_are_grid_sample_positions_of_the_index() -> None:
    h, w = 5, 7
    maps = torch.randn(2, 3, h, w)
    region = torch.rand(2, h, w) > 0.4
    index, coords = sample_points(region, 9, _generator())
    assert torch.equal(coords, point_coords(index, h, w))
    bilinear = F.grid_sample(maps, coords.unsqueeze(2), mode="bilinear", align_corners=True).squeeze(-1)
    gathered = gather_points(maps, torch.arange(2), index)  # 2 x 9 x 3
    assert torch.allclose(bilinear.transpose(1, 2), gathered, atol=1e-5)
    # Same generator state, same points.
    again, _ = sample_points(region, 9, _generator())
    assert torch.equal(index, again)


# --- SimNet ----------------------------------------------------------------------------------------------


def test_simnet_probability_shape_and_batch_norm_modes() -> None:
    net = SimNet(in_dim=8, width=16, blocks=3)
    x = torch.randn(50, 16)
    p = net(x)
    assert p.shape == (50,) and (p >= 0).all() and (p <= 1).all()
    assert net.logits(x.view(5, 10, 16)).shape == (5, 10, 2)
    assert torch.allclose(net.logits(x).softmax(-1)[:, 1], p, atol=1e-6)
    # "batch" normalises with the batch's statistics but leaves the running statistics alone.
    before = net.blocks[0].bn1.running_mean.clone()
    net(x * 3 + 1, stats="batch")
    assert torch.equal(net.blocks[0].bn1.running_mean, before)
    net(x * 3 + 1)  # train mode, "auto": updates them
    assert not torch.equal(net.blocks[0].bn1.running_mean, before)
    net.eval()
    assert torch.allclose(net(x), net(x, stats="running"))


def test_pair_grid_orders_first_then_second() -> None:
    a = torch.arange(6.0).view(3, 2)
    b = 10 + torch.arange(4.0).view(2, 2)
    grid = pair_grid(a, b)
    assert grid.shape == (3, 2, 4)
    assert torch.equal(grid[2, 1], torch.cat([a[2], b[1]]))


# --- balanced weights ------------------------------------------------------------------------------------


def test_balanced_weights_arithmetic_and_window() -> None:
    bw = BalancedWeights(window=3)
    w_pos, w_neg = bw.weights()
    assert w_pos.item() == pytest.approx(0.5) and w_neg.item() == pytest.approx(0.5)
    bw.update(torch.tensor(3), torch.tensor(1))  # P = 1 + 3, N = 1 + 1
    w_pos, w_neg = bw.weights()
    assert w_pos.item() == pytest.approx(2 / 6) and w_neg.item() == pytest.approx(4 / 6)
    bw.update(5, 5)
    bw.update(1, 9)  # window 3: the initial (1, 1) entry rolls out; P = 3 + 5 + 1, N = 1 + 5 + 9
    w_pos, w_neg = bw.weights()
    assert w_pos.item() == pytest.approx(15 / 24) and w_neg.item() == pytest.approx(9 / 24)
    restored = BalancedWeights(window=3)
    restored.load_state_dict(bw.state_dict())
    assert torch.equal(restored.history, bw.history) and restored.cursor.item() == bw.cursor.item()


# --- distillation loss map -------------------------------------------------------------------------------


def test_distill_loss_map_values() -> None:
    t = torch.tensor([1.0, 0.0, 0.9, 0.2])
    s = torch.tensor([1.0, 0.0, 0.3, 0.6])
    ce = distill_loss_map(t, s, "ce")
    assert ce[0].item() == pytest.approx(-0.99 * math.log(0.99) - 0.01 * math.log(0.01), rel=1e-5)
    assert ce[2].item() == pytest.approx(-0.9 * math.log(0.3) - 0.1 * math.log(0.7), rel=1e-5)
    cce = distill_loss_map(t, s, "cce")
    assert cce[0].item() == pytest.approx(-0.5 * math.log(2.0), rel=1e-5)
    assert cce[1].item() == pytest.approx(-0.5 * math.log(2.0), rel=1e-5)
    assert cce[2].item() == pytest.approx(-0.4 * math.log(1.3), rel=1e-5)
    assert cce[3].item() == pytest.approx(-0.3 * math.log(1.4), rel=1e-5)
    with pytest.raises(ValueError):
        distill_loss_map(t, s, "b0.5")


# --- gradients -------------------------------------------------------------------------------------------


def test_sim_loss_trains_only_simnet() -> None:
    batch, (mf, logits, masks) = _mixed_case()
    loss = PixelSimilarityLoss(SimilarityConfig(base_points=10, novel_points=10), embed_dim=6)
    out = loss(mf, logits, masks, batch, generator=_generator())
    assert set(out) == {"loss_sim", "loss_distill"}
    assert out["loss_sim"].item() > 0
    out["loss_sim"].backward()
    assert mf.grad is None and logits.grad is None and masks.grad is None
    grads = [p.grad for p in loss.simnet.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_distill_loss_trains_only_the_segmenter() -> None:
    batch, (mf, logits, masks) = _mixed_case()
    loss = PixelSimilarityLoss(SimilarityConfig(base_points=10, novel_points=10), embed_dim=6)
    out = loss(mf, logits, masks, batch, generator=_generator())
    out["loss_distill"].backward()
    assert all(p.grad is None for p in loss.simnet.parameters())
    assert mf.grad is None  # the teacher's features are detached too
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert masks.grad is not None and masks.grad.abs().sum() > 0


def test_distill_is_zero_without_a_shared_novel_class() -> None:
    batch, (mf, logits, masks) = _mixed_case()
    batch["targets"] = [_targets([1, 2], [5]), _targets([1, 2], [6])]
    loss = PixelSimilarityLoss(SimilarityConfig(base_points=10, novel_points=10), embed_dim=6)
    out = loss(mf, logits, masks, batch, generator=_generator())
    assert out["loss_distill"].item() == 0.0
    out["loss_distill"].backward()  # still a graph to backpropagate through
    assert logits.grad is not None and logits.grad.abs().sum() == 0


# --- validity and balance counting -----------------------------------------------------------------------


def test_pairs_of_two_non_base_pixels_contribute_nothing() -> None:
    h = w = 8
    _, (mf, logits, masks) = _mixed_case()
    none_base = torch.full((2, 4 * h, 4 * w), 255)
    loss = PixelSimilarityLoss(SimilarityConfig(base_points=10, novel_points=10), embed_dim=6)
    batch = _batch(none_base, [_targets([], [5]), _targets([], [5])], [(0, 1)])
    out = loss(mf, logits, masks, batch, generator=_generator())
    assert out["loss_sim"].item() == 0.0
    out["loss_sim"].backward()
    assert all(p.grad.abs().sum() == 0 for p in loss.simnet.parameters())
    assert torch.equal(loss.balance.history[1], torch.zeros(2))  # nothing valid was counted

    # One side all base, the other none: every cross pair has one base pixel -> all valid (OR, not AND).
    loss = PixelSimilarityLoss(SimilarityConfig(base_points=10, novel_points=10), embed_dim=6)
    half = none_base.clone()
    half[0] = 1
    batch = _batch(half, [_targets([1], [5]), _targets([], [5])], [(0, 1)])
    out = loss(mf.detach(), logits.detach(), masks.detach(), batch, generator=_generator())
    assert out["loss_sim"].item() > 0
    assert torch.equal(loss.balance.history[1], torch.tensor([0.0, 2 * 10 * 10]))  # all negatives, both ways


def test_balance_counts_valid_pairs_of_both_directions_and_self_pairs_once() -> None:
    h = w = 8
    labels = torch.full((3, 4 * h, 4 * w), 1)
    targets = [_targets([1], []) for _ in range(3)]
    mf, logits, masks = _outputs(3, 6, h, w)
    loss = PixelSimilarityLoss(SimilarityConfig(base_points=10, novel_points=10), embed_dim=6)
    loss(mf, logits, masks, _batch(labels, targets, [(0, 1)]), generator=_generator())
    assert torch.equal(loss.balance.history[1], torch.tensor([200.0, 0.0]))  # J x J, two directions
    loss(mf, logits, masks, _batch(labels, targets, [(0, 0), (1, 1), (2, 2)]), generator=_generator())
    assert torch.equal(loss.balance.history[2], torch.tensor([300.0, 0.0]))  # J x J once per self pair
    loss.eval()  # no counting outside training
    loss(mf, logits, masks, _batch(labels, targets, [(0, 1)]), generator=_generator())
    assert torch.equal(loss.balance.history[3], torch.zeros(2))


def test_self_pairing_without_pairs_key() -> None:
    batch, (mf, logits, masks) = _mixed_case()
    del batch["pairs"]
    cfg = SimilarityConfig(pairing="self", base_points=10, novel_points=10)
    out = PixelSimilarityLoss(cfg, embed_dim=6)(mf, logits, masks, batch, generator=_generator())
    assert torch.isfinite(out["loss_sim"]) and torch.isfinite(out["loss_distill"])
    with pytest.raises(KeyError):
        PixelSimilarityLoss(SimilarityConfig(pairing="cross"), embed_dim=6)(mf, logits, masks, batch)


def test_self_pairs_compute_one_direction_with_the_losses_of_both(monkeypatch) -> None:
    """A batch of self pairs (Self-Pair) evaluates SimNet on one direction only: its second direction is the
    same ordered pairs, so losses, gradients, balance counts and SimNet's batch statistics are those of
    computing both and masking the second (the cross-pair path). Cross pairs under 'self' are refused."""
    batch, (mf, logits, masks) = _random_scene(seed=1)
    batch["pairs"] = torch.tensor([(b, b) for b in range(mf.shape[0])])
    cfg = SimilarityConfig(pairing="self", base_points=9, novel_points=7, simnet_width=8)
    torch.manual_seed(0)
    one = PixelSimilarityLoss(cfg, embed_dim=6)
    both = PixelSimilarityLoss(cfg, embed_dim=6)
    both.load_state_dict(one.state_dict())
    rows = []
    original = one.simnet.pair_logits

    def counting(first, second, stats="auto"):
        rows.append(first.shape[:-2].numel() * first.shape[-2] * second.shape[-2])
        return original(first, second, stats)

    monkeypatch.setattr(one.simnet, "pair_logits", counting)
    results = []
    for module in (one, both):
        if module is both:
            monkeypatch.setattr(pixel_similarity, "_all_self_pairs", lambda pairs, pairing: False)
        inputs = [t.detach().clone().requires_grad_() for t in (mf, logits, masks)]
        out = module(*inputs, batch, generator=_generator(3))
        (out["loss_sim"] + out["loss_distill"]).backward()
        results.append((out, inputs))
    assert rows[0] == mf.shape[0] * 9 * 9  # SimLoss on P x 1 x J x J pairs, not P x 2
    (out_one, in_one), (out_both, in_both) = results
    assert out_one["loss_distill"].item() != 0.0
    for key in ("loss_sim", "loss_distill"):
        assert out_one[key].item() == pytest.approx(out_both[key].item(), rel=1e-5), key
    for x_one, x_both in zip(in_one[1:], in_both[1:]):
        assert torch.allclose(x_one.grad, x_both.grad, rtol=1e-4, atol=1e-6 * x_both.grad.abs().max())
    _assert_close_grads(both, one, rtol=1e-4, atol=1e-5)
    assert torch.equal(one.balance.history, both.balance.history)
    for (name, x), y in zip(both.named_buffers(), one.buffers()):
        # The running variance's Bessel factor n / (n - 1) counts each pair once here, twice there (0.15 %).
        assert torch.allclose(y, x, rtol=2e-3 if name.endswith("running_var") else 1e-5, atol=1e-6), name
    monkeypatch.undo()
    batch["pairs"] = torch.tensor([(0, 1), (2, 2)])
    with pytest.raises(ValueError, match="cross-image pairs"):
        one(mf, logits, masks, batch)


# --- constructed teacher / student ----------------------------------------------------------------------


class _StubTeacher(nn.Module):
    """Calls two pixels similar iff their (one-hot) embeddings agree, or the opposite when ``invert``."""

    def __init__(self, dim: int, invert: bool) -> None:
        super().__init__()
        self.dim = dim
        self.invert = invert
        self.bias = nn.Parameter(torch.zeros(2))

    def pair_logits(self, first: torch.Tensor, second: torch.Tensor, stats: str = "auto") -> torch.Tensor:
        return self.bias.expand(*first.shape[:-1], second.shape[-2], 2)

    def pair_probs(self, first: torch.Tensor, second: torch.Tensor, stats: str = "auto") -> torch.Tensor:
        same = (first @ second.transpose(-1, -2)).clamp(0, 1)  # [f_j; g_k]: f_j . g_k
        return 1 - same if self.invert else same


def _novel_scene():
    """Two images; top row base (class 1); below, novel 5 on the left half and novel 6 on the right half.
    Embeddings are one-hot novel classes; query 0 predicts class 5 on the left, query 1 class 6 on the
    right, so the student's novel score vectors are (1, 0) on the left and (0, 1) on the right."""
    h = w = 8
    labels = torch.full((2, 4 * h, 4 * w), 255)
    labels[:, :4] = 1
    mf = torch.zeros(2, 2, h, w)
    mf[:, 0, 1:, :4] = 1
    mf[:, 1, 1:, 4:] = 1
    logits = torch.full((2, 2, 9), -10.0)
    logits[:, 0, 5] = 10.0
    logits[:, 1, 6] = 10.0
    masks = torch.full((2, 2, h, w), -10.0)
    masks[:, 0, :, :4] = 10.0
    masks[:, 1, :, 4:] = 10.0
    targets = [_targets([1], [5, 6]), _targets([1], [5, 6])]
    return _batch(labels, targets, [(0, 1)]), mf, logits.requires_grad_(), masks.requires_grad_()


@pytest.mark.parametrize("kind", ["ce", "cce"])
def test_distill_low_when_student_agrees_with_teacher(kind: str) -> None:
    values = {}
    for invert in (False, True):
        batch, mf, logits, masks = _novel_scene()
        loss = PixelSimilarityLoss(SimilarityConfig(base_points=10, novel_points=20, distill_loss=kind), 2)
        loss.simnet = _StubTeacher(2, invert)
        values[invert] = loss(mf, logits, masks, batch, generator=_generator())["loss_distill"].item()
    if kind == "ce":
        perfect = -0.99 * math.log(0.99) - 0.01 * math.log(0.01)
        assert values[False] == pytest.approx(perfect, rel=1e-3)
        assert values[True] == pytest.approx(-0.01 * math.log(0.99) - 0.99 * math.log(0.01), rel=1e-3)
    else:
        assert values[False] == pytest.approx(-0.5 * math.log(2.0), rel=1e-3)
        assert values[True] == pytest.approx(0.0, abs=1e-3)
    assert values[False] < values[True]


@pytest.mark.parametrize("kind", ["ce", "cce"])
def test_distill_leaves_out_points_the_sampler_took_outside_the_region(kind: str) -> None:
    """56 non-base pixels and J = 60: SimFormer's sampler adds 4 pixels of the base row, where the student's
    novel scores disagree with the teacher. With ``distill_region_only`` their pairs are left out (the loss of
    a J that fits the region, no gradient at the base row); without, they count."""
    values, base_row_grads = {}, {}
    for region_only, j in ((True, 20), (True, 60), (False, 60)):
        batch, mf, logits, masks = _novel_scene()
        cfg = SimilarityConfig(base_points=10, novel_points=j, distill_loss=kind, distill_region_only=region_only)
        loss = PixelSimilarityLoss(cfg, 2)
        loss.simnet = _StubTeacher(2, invert=False)
        out = loss(mf, logits, masks, batch, generator=_generator())["loss_distill"]
        out.backward()
        values[region_only, j] = out.item()
        base_row_grads[region_only, j] = masks.grad[:, :, 0].abs().sum().item()
    assert values[True, 60] == pytest.approx(values[True, 20], rel=1e-4)
    assert values[False, 60] > values[True, 60] + 1e-3
    assert base_row_grads[True, 60] == 0.0
    if kind == "cce":  # "ce" clamps the saturated student (s = 1 at the base row): no gradient there either way
        assert base_row_grads[False, 60] > 0.0
    assert loss.metrics.get("distill_points_inside") is None  # SimFormer's mode does not look


def test_pred_masks_at_another_resolution_are_sampled_bilinearly() -> None:
    batch, (mf, logits, masks) = _mixed_case()
    h, w = masks.shape[-2:]
    # With align_corners=True the small grid's points are every other point of a (2h-1) x (2w-1) grid.
    fine = F.interpolate(masks.detach(), size=(2 * h - 1, 2 * w - 1), mode="bilinear", align_corners=True)
    loss = PixelSimilarityLoss(SimilarityConfig(base_points=10, novel_points=10), embed_dim=6)
    loss.eval()  # same teacher statistics and no counting in both calls
    a = loss(mf, logits, masks, batch, generator=_generator())["loss_distill"]
    b = loss(mf, logits, fine, batch, generator=_generator())["loss_distill"]
    assert a.item() == pytest.approx(b.item(), rel=1e-4)


# --- the pair-grid evaluation against the plain reference ----------------------------------------------


class _GridSimNet(SimNet):
    """The straightforward reference: every pair vector built (pair_grid), then the plain network."""

    def pair_logits(self, first: torch.Tensor, second: torch.Tensor, stats: str = "auto") -> torch.Tensor:
        return self.logits(pair_grid(first, second), stats)

    def pair_probs(self, first: torch.Tensor, second: torch.Tensor, stats: str = "auto") -> torch.Tensor:
        return self(pair_grid(first, second), stats)


def _scrambled_norms(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial batch-norm parameters and running statistics (and so non-trivial running-mode paths)."""
    g = _generator(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))  # some negative scales too
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _assert_close_grads(reference: nn.Module, fast: nn.Module, rtol: float, atol: float) -> None:
    """Parameter gradients equal up to ``rtol`` and ``atol`` times the largest gradient (the Linear biases in
    front of batch-statistics norms have a true gradient of 0: rounding noise in the reference, 0 here)."""
    scale = max(p.grad.abs().max().item() for p in reference.parameters())
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=rtol, atol=atol * scale), name


# Chunks of: slices of a grid (cut along j), two whole grids, all grids.
@pytest.mark.parametrize("chunk_rows", [8, 80, 4096])
@pytest.mark.parametrize("width,in_dim,blocks", [(8, 3, 3), (6, 3, 2), (5, 4, 1)])  # (6, 3): identity residual
@pytest.mark.parametrize("stats,train", [("auto", True), ("batch", True), ("running", True), ("auto", False)])
def test_pair_logits_equal_the_pair_grid_reference(monkeypatch, chunk_rows, width, in_dim, blocks, stats, train):
    monkeypatch.setattr(pixel_similarity, "_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    fast = SimNet(in_dim, width, blocks).double().train(train)
    _scrambled_norms(fast)
    reference = _GridSimNet(in_dim, width, blocks).double().train(train)
    reference.load_state_dict(fast.state_dict())
    g = _generator(1)
    first = (torch.randn(3, 2, 7, in_dim, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    second = torch.randn(3, 2, 5, in_dim, generator=g, dtype=torch.float64).requires_grad_()
    weights = torch.randn(3, 2, 7, 5, 2, generator=g, dtype=torch.float64)

    outputs, inputs = [], []
    for net in (reference, fast):
        f, s = first.detach().clone().requires_grad_(), second.detach().clone().requires_grad_()
        out = net.pair_logits(f, s, stats)
        (out * weights).sum().backward()
        outputs.append(out)
        inputs.append((f, s))
    assert outputs[1].shape == (3, 2, 7, 5, 2)
    assert torch.allclose(outputs[1], outputs[0], rtol=1e-10, atol=1e-10)
    for x_ref, x_fast in zip(*inputs):
        assert torch.allclose(x_fast.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    _assert_close_grads(reference, fast, rtol=1e-9, atol=1e-9)
    for (name, x), y in zip(reference.named_buffers(), fast.buffers()):  # running statistics, batch counts
        assert torch.allclose(y, x, rtol=1e-12, atol=1e-12), name
    with torch.no_grad():
        probs = fast.pair_probs(first, second, "running")
        assert torch.allclose(probs, reference(pair_grid(first, second), "running"), atol=1e-12)


def _random_scene(seed: int, b: int = 4, h: int = 8, w: int = 8):
    """Random weak labels at stride 4 (base classes 1-3 in blobs, 255 elsewhere), padding on some images,
    novel classes 5 and 6 spread over the crops' targets; cross pairs and a self pair."""
    g = _generator(seed)
    coarse = torch.randint(0, 5, (b, h // 2, w // 2), generator=g)
    labels = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels = torch.where(labels >= 4, 255, labels)
    labels[labels == 0] = 255
    pad = torch.zeros(labels.shape, dtype=torch.bool)
    pad[1, :, 24:] = True
    pad[3, 28:] = True
    targets = []
    for i in range(b):
        base = sorted({int(v) for v in labels[i].unique() if v != 255})
        targets.append(_targets(base, [5] if i % 2 == 0 else [5, 6]))
    batch = _batch(labels, targets, [(0, 1), (2, 3), (1, 2), (3, 3)], pad)
    return batch, _outputs(b, 6, h, w, q=5, seed=seed)


@pytest.mark.parametrize("chunk_rows", [16, 4096])
@pytest.mark.parametrize("teacher_bn", ["batch", "running"])
@pytest.mark.parametrize("distill_loss", ["cce", "ce"])
def test_loss_equals_the_pair_grid_reference_over_steps(monkeypatch, chunk_rows, teacher_bn, distill_loss):
    """Same losses, gradients, metrics, balance counts and running statistics as the straightforward
    implementation for the same random draws, over consecutive training steps (the second one reuses the
    first one's work buffers), with an optimiser step in between."""
    monkeypatch.setattr(pixel_similarity, "_CHUNK_ROWS", chunk_rows)
    cfg = SimilarityConfig(base_points=9, novel_points=7, distill_loss=distill_loss, simnet_width=8)
    torch.manual_seed(0)
    fast = PixelSimilarityLoss(cfg, embed_dim=6, teacher_bn=teacher_bn)
    _scrambled_norms(fast.simnet)
    reference = PixelSimilarityLoss(cfg, embed_dim=6, teacher_bn=teacher_bn)
    reference.simnet = _GridSimNet(6, cfg.simnet_width, cfg.simnet_blocks)
    reference.load_state_dict(fast.state_dict())
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, fast)]

    for step in range(3):
        batch, (mf, logits, masks) = _random_scene(seed=step)
        results = []
        for module, optimiser in zip((reference, fast), optimisers):
            inputs = [t.detach().clone().requires_grad_() for t in (mf, logits, masks)]
            out = module(*inputs, batch, generator=_generator(10 + step))
            optimiser.zero_grad()
            (out["loss_sim"] + out["loss_distill"]).backward()
            results.append((out, inputs))
        (out_ref, in_ref), (out_fast, in_fast) = results
        for key in ("loss_sim", "loss_distill"):
            assert out_fast[key].item() == pytest.approx(out_ref[key].item(), rel=1e-5, abs=1e-7), key
        assert out_ref["loss_distill"].item() != 0.0
        for x_ref, x_fast in zip(in_ref[1:], in_fast[1:]):  # pred_logits, pred_masks
            assert torch.allclose(x_fast.grad, x_ref.grad, rtol=1e-4, atol=1e-6 * x_ref.grad.abs().max())
        _assert_close_grads(reference, fast, rtol=1e-4, atol=1e-5)
        for key, value in reference.metrics.items():
            assert fast.metrics[key].item() == pytest.approx(value.item(), rel=1e-5), key
        for (name, x), y in zip(reference.named_buffers(), fast.buffers()):
            assert torch.allclose(y, x, rtol=1e-5, atol=1e-6), name
        for optimiser in optimisers:
            optimiser.step()


def test_pair_logits_graph_without_backward_and_single_backward() -> None:
    net = SimNet(3, 8, 2)
    first, second = torch.randn(2, 6, 3), torch.randn(2, 5, 3)
    net.pair_logits(first, second).sum()  # a graph dropped without backward: its buffers are simply freed
    out = net.pair_logits(first, second)
    expected = net.logits(pair_grid(first, second))
    assert torch.allclose(out, expected, atol=1e-5)
    loss = out.square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()
    with torch.no_grad():  # no graph: the buffers go straight back for the next call
        fast = net.pair_logits(first, second, "batch")
        assert torch.allclose(fast, net.logits(pair_grid(first, second), "batch"), atol=1e-5)
    assert len(net._workspace.free) >= 2
