"""Pixel-pixel similarity transfer (SimFormer §3.4): SimNet trained on base pixels, distilled into novel scores.

Two losses, computed on the FINAL decoder layer only (SimFormer keeps them out of the auxiliary layers):

* ``loss_sim`` (SimLoss): SimNet learns "do these two pixels belong to the same class?" from pairs of
  sampled pixel embeddings (``mask_features``) with base-class labels. The embeddings are detached, so this
  loss trains SimNet and nothing else.
* ``loss_distill`` (DistLoss): on pixels outside the base region of two images that share a novel class,
  the frozen SimNet (teacher, no gradient) judges pixel pairs; the segmenter's novel-class score vectors
  (student) are pulled to agree, via ReLU(cosine). Gradients reach ``pred_logits`` / ``pred_masks`` only.

Pairs of images come from ``batch["pairs"]`` (P x 2 batch indices). A cross pair (a, b) samples J points in
each image and forms all J x J pairs in both directions, ``[f_a; f_b]`` and ``[f_b; f_a]``, exactly what
SimFormer's 0<->1 batch swap does with its one pair per GPU. A self pair (b, b) samples one set of J points
and forms its J x J ordered pairs once: the reverse direction would repeat the same pairs (the diagonal,
a pixel with itself, is kept; it is 1/J of the pairs).

Normalisation: SimFormer runs one pair per GPU and DDP averages the per-GPU losses, so each pair is
normalised on its own (SimLoss by its own valid-pair count, DistLoss by its own J x J pair count) and the
losses are the mean over pairs; a pair without valid / distillable pixels contributes 0 to that mean, as an
idle GPU did.

Decisions on SimFormer's quirks (see also the class docstrings):

* Pair validity is OR (at least one of the two pixels is base), as in SimFormer (§8 quirk 2). A base pixel
  against a non-base pixel is a genuine negative ("different class") whatever the non-base pixel is; only
  pairs of two non-base pixels are unknown.
* Labels: the weak map (base ids, 255 elsewhere) is used. With the OR rule it gives exactly the SimNet
  labels of SimFormer's full ground truth: a valid pair has a base pixel with its true id, and the other
  pixel is either base (true id in both maps) or non-base (novel id or 255 in the full map, 255 in the weak
  map; both differ from the base id, so the label is 0 either way). Pairs of two non-base pixels differ
  (novel A vs novel B is 0 in the full map, 255 vs 255 is 1 in the weak map) but are invalid. A label map
  that carries novel ids works too: the base region excludes ``novel_ids`` explicitly.
* Balanced weights count only VALID pairs, all of them (SimFormer counts every 5th pair in each dimension,
  valid or not). Counting valid pairs is what makes the weights independent of the label map (above: the
  invalid pairs' labels differ between the weak and full maps) and matches the pairs the weights multiply;
  subsampling was only a cheap estimate of the same ratio.
* DistLoss points exclude padding by default (``distill_padding=False``); SimFormer samples the whole
  non-base region, padding included. Padding has no image content and no test-time counterpart, and on
  scale-jittered 640 crops it can be a large share of the non-base region, so excluding it makes every
  distillation point land on real novel/unlabelled pixels. ``distill_padding=True`` restores SimFormer.
* Teacher batch norm: ``teacher_bn="batch"`` (default, SimFormer) normalises the teacher's pairs with their
  own batch statistics, as SimFormer's teacher ran in train mode; unlike SimFormer it does not update the
  running statistics with them (they are not used in training either way; keeping them base-pair only keeps
  ``teacher_bn="running"`` meaningful). ``"running"`` uses the running statistics of the SimLoss batches.
  In eval mode both use running statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakshot.config import SimilarityConfig
from weakshot.losses.matcher import nearest_downsample

IGNORE_LABEL = 255
_EPS = 1e-5
_LOG_CLAMP = 0.01  # SimFormer's clamp of teacher and student for the "ce" distillation loss


# --- SimNet ----------------------------------------------------------------------------------------------


def _norm(bn: nn.BatchNorm1d, x: Tensor, stats: str) -> Tensor:
    """Batch norm with an explicit choice of statistics.

    ``"auto"``: the module's own train/eval behaviour. ``"batch"``: this batch's statistics, running
    statistics left untouched. ``"running"``: the running statistics (eval behaviour).
    """
    if stats == "auto":
        return bn(x)
    if stats == "batch":
        return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    if stats == "running":
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    raise ValueError(f"stats must be 'auto', 'batch' or 'running', not {stats!r}")


class SimBlock(nn.Module):
    """Residual block: Linear-BN-ReLU-Linear-BN-ReLU, plus the input (or its Linear+ReLU projection when
    the width changes). The ReLU sits before the addition, as in SimFormer's block."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.bn1 = nn.BatchNorm1d(out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.bn2 = nn.BatchNorm1d(out_dim)
        self.project = nn.Linear(in_dim, out_dim) if in_dim != out_dim else None

    def forward(self, x: Tensor, stats: str = "auto") -> Tensor:
        residual = x if self.project is None else F.relu(self.project(x))
        y = F.relu(_norm(self.bn1, self.fc1(x), stats))
        y = F.relu(_norm(self.bn2, self.fc2(y), stats))
        return y + residual


class SimNet(nn.Module):
    """Pixel-pair similarity network: ``[f_i; f_j]`` (N x 2*in_dim) -> P(same class) (N).

    SimFormer writes it with 1x1 convolutions and BatchNorm2d over a B x 2D x J x J grid. A 1x1 convolution
    is a Linear layer applied at every position, and BatchNorm2d pools its statistics over batch and both
    spatial axes, i.e. over every pair: on a flat N x 2D batch of pairs, Linear + BatchNorm1d is the same
    function with the same parameters, and needs no fake spatial layout.
    """

    def __init__(self, in_dim: int, width: int = 256, blocks: int = 3) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError("SimNet needs at least one residual block")
        dims = [2 * in_dim] + [width] * blocks
        self.blocks = nn.ModuleList(SimBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, 2)

    def logits(self, pairs: Tensor, stats: str = "auto") -> Tensor:
        """Two logits (dissimilar, similar) per pair: ``[..., 2D]`` -> ``[..., 2]``."""
        lead = pairs.shape[:-1]
        x = pairs.reshape(-1, pairs.shape[-1])
        for block in self.blocks:
            x = block(x, stats)
        return self.head(x).reshape(*lead, 2)

    def forward(self, pairs: Tensor, stats: str = "auto") -> Tensor:
        """P(similar) = softmax(logits)[..., 1], in [0, 1]: ``[..., 2D]`` -> ``[...]``."""
        return self.logits(pairs, stats).float().softmax(-1)[..., 1]


# --- point sampling --------------------------------------------------------------------------------------


def sample_points(
    region: Tensor, num: int, generator: torch.Generator | None = None, jitter: float = 0.1
) -> tuple[Tensor, Tensor]:
    """SimFormer's point sampler: top-``num`` of ``region + U(0, jitter)`` in each map.

    ``region`` bool ``B x h x w``. Points inside the region score >= 1 and outside < ``jitter`` < 1, so a
    region with >= ``num`` pixels yields ``num`` distinct points uniformly at random inside it (the top-k of
    i.i.d. uniforms is a uniform random subset); a smaller region yields all its pixels, topped up with
    uniformly random pixels outside it. ``generator`` must live on ``region``'s device.

    Returns ``(index, coords)``: ``index`` long ``B x num``, flat positions ``y * w + x``; ``coords`` float
    ``B x num x 2``, the same points as (x, y) in [-1, 1] for ``F.grid_sample(..., align_corners=True)``.
    At these integer grid positions bilinear sampling (align_corners=True) equals a gather, which is what
    :func:`gather_points` does when maps have the mask-feature size.
    """
    b, h, w = region.shape
    if num > h * w:
        raise ValueError(f"cannot sample {num} distinct points from a {h}x{w} map")
    noise = torch.rand(region.shape, generator=generator, device=region.device) * jitter
    score = (region.float() + noise).reshape(b, h * w)
    index = score.topk(num, dim=1).indices
    return index, point_coords(index, h, w)


def point_coords(index: Tensor, h: int, w: int) -> Tensor:
    """Flat positions ``[..., K]`` on an h x w grid -> (x, y) in [-1, 1] (align_corners=True), ``[..., K, 2]``."""
    x = (index % w).float() * (2.0 / max(w - 1, 1)) - 1.0
    y = torch.div(index, w, rounding_mode="floor").float() * (2.0 / max(h - 1, 1)) - 1.0
    return torch.stack([x, y], dim=-1)


def gather_points(maps: Tensor, image: Tensor, index: Tensor) -> Tensor:
    """Values of ``maps`` (``B x C x h x w``) at flat positions ``index`` of images ``image``.

    ``image`` long ``[...]`` (batch indices) and ``index`` long ``[..., K]`` -> ``[..., K, C]``. One advanced
    index on the ``B x C x (h*w)`` view: no copy of whole maps (per pair or channels-last).
    """
    return maps.flatten(2)[image.unsqueeze(-1), :, index]


def sample_bilinear(maps: Tensor, image: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``maps`` at normalised (x, y) ``coords`` ``[P, S, K, 2]`` of images ``image``
    ``[P, S]`` (align_corners=True) -> ``[P, S, K, C]``. Used when a map is not at the mask-feature size."""
    p, s, k, _ = coords.shape
    selected = maps[image.reshape(-1)]
    out = F.grid_sample(selected, coords.reshape(p * s, k, 1, 2), mode="bilinear", align_corners=True)
    return out.squeeze(-1).transpose(1, 2).reshape(p, s, k, -1)


# --- class-balanced weights ------------------------------------------------------------------------------


class BalancedWeights(nn.Module):
    """Running positive / negative pair counts over the last ``window`` iterations (SimFormer's
    ``BalanceBinaryWeightManager``): ``w_pos = N / (P + N)``, ``w_neg = P / (P + N)``.

    The history starts with one entry (1 positive, 1 negative), as SimFormer's deques; once ``window``
    updates have been made that entry has rolled out. The ring buffer and its cursor are tensors updated in
    place on the loss device, so an update costs no host synchronisation, and both are saved in the state
    dict (a resumed run continues with the same weights). What is counted is the caller's choice;
    :class:`PixelSimilarityLoss` counts all valid pairs of the step (see the module docstring).
    """

    history: Tensor
    cursor: Tensor

    def __init__(self, window: int = 25) -> None:
        super().__init__()
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        history = torch.zeros(window, 2)  # columns: positives, negatives
        history[0] = 1.0
        self.register_buffer("history", history)
        self.register_buffer("cursor", torch.tensor(1 % window, dtype=torch.int64))

    @torch.no_grad()
    def update(self, positives: Tensor | float, negatives: Tensor | float) -> None:
        row = torch.stack([torch.as_tensor(positives), torch.as_tensor(negatives)]).to(self.history)
        self.history.index_copy_(0, self.cursor.view(1), row.view(1, 2))
        self.cursor.add_(1).remainder_(self.window)

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(w_pos, w_neg)``: the rarer label gets the larger weight; they sum to 1."""
        pos, neg = self.history.sum(0).unbind()
        total = pos + neg
        return neg / total, pos / total


# --- loss pieces -----------------------------------------------------------------------------------------


def pair_grid(first: Tensor, second: Tensor) -> Tensor:
    """All ordered pairs ``[first_j; second_k]``: ``[..., J, D]`` x ``[..., K, D]`` -> ``[..., J, K, 2D]``."""
    j, k = first.shape[-2], second.shape[-2]
    a = first.unsqueeze(-2).expand(*first.shape[:-1], k, first.shape[-1])
    b = second.unsqueeze(-3).expand(*second.shape[:-2], j, k, second.shape[-1])
    return torch.cat([a, b], dim=-1)


def distill_loss_map(teacher: Tensor, student: Tensor, kind: str) -> Tensor:
    """Elementwise distillation loss between teacher and student similarities in [0, 1].

    ``"ce"``: both clamped to [0.01, 0.99], ``-t log s - (1 - t) log(1 - s)``.
    ``"cce"`` (threshold 0.5): ``-ReLU(t - 0.5) log(1 + s) - ReLU(0.5 - t) log(2 - s)``; only the side of
    0.5 the teacher is on pulls the student, with a bounded (log 2) reward instead of an unbounded penalty.
    """
    if kind == "ce":
        t = teacher.clamp(_LOG_CLAMP, 1 - _LOG_CLAMP)
        s = student.clamp(_LOG_CLAMP, 1 - _LOG_CLAMP)
        return -t * s.log() - (1 - t) * (1 - s).log()
    if kind == "cce":
        return -F.relu(teacher - 0.5) * torch.log1p(student) - F.relu(0.5 - teacher) * torch.log(2 - student)
    raise ValueError(f"distill_loss must be 'ce' or 'cce', not {kind!r}")


def class_hot(targets: Sequence[dict[str, Tensor]], num_classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Crop-level class presence from the targets: ``(base, novel)`` bool ``B x K``.

    Base = mask-carrying targets, novel = mask-less targets (image-level labels). Built with scatters, so
    no host synchronisation on the loss device.
    """
    base = torch.zeros(len(targets), num_classes, device=device)
    novel = torch.zeros(len(targets), num_classes, device=device)
    for b, t in enumerate(targets):
        labels = t["labels"].to(device)
        has = t["has_mask"].to(device)
        base[b].scatter_(0, labels, has.float())
        novel[b].scatter_(0, labels, (~has).float())
    return base.bool(), novel.bool()


# --- the loss module -------------------------------------------------------------------------------------


class PixelSimilarityLoss(nn.Module):
    """SimLoss + DistLoss of SimFormer, with the SimNet they share (see the module docstring).

    ``forward(mask_features, pred_logits, pred_masks, batch)`` uses the final decoder layer's outputs and
    the batch keys ``pairs`` (P x 2; when absent and ``cfg.pairing == "self"``, every image is paired with
    itself), ``labels``, ``pad_mask``, ``targets`` and ``novel_ids``. Labels and padding are nearest-
    downsampled to the mask-feature size (as SimFormer does with its GT map).

    SimLoss, per pair (a, b): if the crops share base classes (from the targets), one is drawn uniformly
    as c* and the positive region of each image is its c* pixels; otherwise the whole base region. Each
    image gets ``int(positive_fraction * J)`` points in its positive region and the rest in
    (not padding) and (not positive); label 1[label_i == label_j]; valid if at least one pixel is base;
    loss = sum(w_y * CE * v) / sum(v) over the pair's J x J (x 2 directions) pairs, with class-balanced
    weights w_y from :class:`BalancedWeights` (updated in training mode only).

    DistLoss, for pairs whose crops share a novel class (mask-less targets): ``novel_points`` points per
    image in the non-base region (padding excluded unless ``distill_padding``); teacher
    t = SimNet([f_i; f_j]) without gradient; student s = ReLU(cos(S(i), S(j))) with
    S[c] = sum_q softmax(cls_q)[c] * sigmoid(mask_q) over the split's novel classes c, sampled at the
    points; mean of :func:`distill_loss_map` over the pair's J x J (x 2) pairs, 0 for other pairs.
    """

    def __init__(
        self,
        cfg: SimilarityConfig,
        embed_dim: int,
        teacher_bn: str = "batch",
        distill_padding: bool = False,
    ) -> None:
        super().__init__()
        if teacher_bn not in ("batch", "running"):
            raise ValueError(f"teacher_bn must be 'batch' or 'running', not {teacher_bn!r}")
        if cfg.distill_loss not in ("ce", "cce"):
            raise ValueError(f"similarity.distill_loss must be 'ce' or 'cce', not {cfg.distill_loss!r}")
        if not 0.0 < cfg.positive_fraction < 1.0:
            raise ValueError("similarity.positive_fraction must lie in (0, 1)")
        self.cfg = cfg
        self.teacher_bn = teacher_bn
        self.distill_padding = distill_padding
        self.simnet = SimNet(embed_dim, cfg.simnet_width, cfg.simnet_blocks)
        self.balance = BalancedWeights(cfg.balance_window)
        # Detached diagnostics of the last call (logging only; not losses).
        self.metrics: dict[str, Tensor] = {}

    def forward(
        self,
        mask_features: Tensor,
        pred_logits: Tensor,
        pred_masks: Tensor,
        batch: dict[str, Any],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        device = mask_features.device
        b, _, h, w = mask_features.shape
        pairs = batch.get("pairs")
        if pairs is None:
            if self.cfg.pairing != "self":
                raise KeyError("batch has no 'pairs' (needed for cross-image pixel similarity)")
            pairs = torch.arange(b).unsqueeze(1).expand(b, 2)
        pairs = pairs.to(device)
        novel_ids = batch["novel_ids"].to(device)

        labels = nearest_downsample(batch["labels"].to(device), (h, w)).reshape(b, h * w)
        pad = nearest_downsample(batch["pad_mask"].to(device), (h, w)).reshape(b, h * w)
        base = (labels != IGNORE_LABEL) & ~torch.isin(labels, novel_ids)
        base_hot, novel_hot = class_hot(batch["targets"], pred_logits.shape[-1] - 1, device)

        is_self = pairs[:, 0] == pairs[:, 1]
        # Direction d of pair p pairs side d's points with side 1-d's; for a self pair the second direction
        # repeats the first and is masked out.
        directions = torch.stack([torch.ones_like(is_self), ~is_self], dim=1)  # P x 2
        view = _PairView(pairs, is_self, directions, labels, pad, base, h, w)

        loss_sim = self._sim_loss(mask_features, view, base_hot, generator)
        loss_distill = self._distill_loss(mask_features, pred_logits, pred_masks, view, novel_hot, novel_ids, generator)
        return {"loss_sim": loss_sim, "loss_distill": loss_distill}

    # -- SimLoss --

    def _sim_loss(
        self, mask_features: Tensor, view: _PairView, base_hot: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        num_points = self.cfg.base_points
        num_pos = int(num_points * self.cfg.positive_fraction)
        pairs, h, w = view.pairs, view.h, view.w
        p = pairs.shape[0]

        # c*: uniform among the base classes both crops carry (argmax of uniforms restricted to them).
        common = base_hot[pairs[:, 0]] & base_hot[pairs[:, 1]]  # P x K
        draw = torch.rand(common.shape, generator=generator, device=common.device)
        chosen = torch.where(common, draw, -1.0).argmax(1)  # P
        has_common = common.any(1)

        side_labels = view.labels[pairs]  # P x 2 x hw
        positive = torch.where(has_common[:, None, None], side_labels == chosen[:, None, None], view.base[pairs])
        negative = ~view.pad[pairs] & ~positive
        pos_index, _ = sample_points(positive.reshape(2 * p, h, w), num_pos, generator)
        neg_index, _ = sample_points(negative.reshape(2 * p, h, w), num_points - num_pos, generator)
        index = torch.cat([pos_index, neg_index], dim=1).reshape(p, 2, num_points)
        index = _share_self(index, view.is_self)

        feats = gather_points(mask_features.detach(), pairs, index)  # P x 2 x J x D
        point_labels = view.labels[pairs.unsqueeze(-1), index]  # P x 2 x J
        point_base = view.base[pairs.unsqueeze(-1), index]

        other = [1, 0]  # direction d pairs side d with side 1 - d
        logits = self.simnet.logits(pair_grid(feats, feats[:, other])).float()  # P x 2 x J x J x 2
        target = point_labels.unsqueeze(-1) == point_labels[:, other].unsqueeze(-2)  # P x 2 x J x J
        valid = point_base.unsqueeze(-1) | point_base[:, other].unsqueeze(-2)  # OR: >= 1 base pixel
        valid = valid & view.directions[:, :, None, None]

        if self.training:
            self.balance.update((target & valid).sum(), (~target & valid).sum())
        w_pos, w_neg = self.balance.weights()
        # BCE(softmax(logits)[1], y) computed as the 2-way cross-entropy of the logits: same value, stable.
        ce = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1).long(), reduction="none").view_as(target)
        weighted = torch.where(target, w_pos, w_neg) * ce
        num = torch.where(valid, weighted, 0.0).flatten(1).sum(1)
        den = valid.flatten(1).sum(1).clamp(min=_EPS)

        with torch.no_grad():
            hit = (logits[..., 1] > logits[..., 0]) == target
            self.metrics = {
                "simnet_acc": (hit & valid).sum() / valid.sum().clamp(min=1),
                "simnet_w_pos": w_pos.detach(),
            }
        return (num / den).mean()

    # -- DistLoss --

    def _distill_loss(
        self,
        mask_features: Tensor,
        pred_logits: Tensor,
        pred_masks: Tensor,
        view: _PairView,
        novel_hot: Tensor,
        novel_ids: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        if novel_ids.numel() == 0:  # oracle / fully supervised batches: nothing to distil
            return (pred_logits.sum() + pred_masks.sum()) * 0.0
        num_points = self.cfg.novel_points
        pairs, h, w = view.pairs, view.h, view.w
        p = pairs.shape[0]
        shares = (novel_hot[pairs[:, 0]] & novel_hot[pairs[:, 1]]).any(1)  # P

        region = ~view.base if self.distill_padding else ~view.base & ~view.pad
        index, _ = sample_points(region[pairs].reshape(2 * p, h, w), num_points, generator)
        index = _share_self(index.reshape(p, 2, num_points), view.is_self)
        other = [1, 0]

        with torch.no_grad():
            feats = gather_points(mask_features.detach(), pairs, index)
            stats = "batch" if (self.training and self.teacher_bn == "batch") else "running"
            teacher = self.simnet(pair_grid(feats, feats[:, other]), stats=stats)  # P x 2 x J x J

        # Student: sigmoid(mask) at the points, mixed by the novel-class probabilities. Bilinear sampling is
        # linear, so sampling sigmoid(masks) and then mixing equals sampling the score map S. At the
        # mask-feature size the points are grid positions: gather, then sigmoid (J values per query, not the
        # whole map). Other sizes: sigmoid at mask resolution, then bilinear sampling.
        if tuple(pred_masks.shape[-2:]) == (h, w):
            mask_probs = gather_points(pred_masks, pairs, index).float().sigmoid()  # P x 2 x J x Q
        else:
            mask_probs = sample_bilinear(pred_masks.float().sigmoid(), pairs, point_coords(index, h, w))
        probs = pred_logits.float().softmax(-1)[..., novel_ids]  # B x Q x N
        scores = torch.einsum("psjq,psqn->psjn", mask_probs, probs[pairs])
        unit = F.normalize(scores, dim=-1, eps=1e-8)
        student = F.relu(unit @ unit[:, other].transpose(-1, -2))  # P x 2 x J x J

        loss = distill_loss_map(teacher, student, self.cfg.distill_loss)
        active = (shares[:, None] & view.directions)[:, :, None, None]
        per_pair = torch.where(active, loss, 0.0).flatten(1).sum(1)
        per_pair = per_pair / (view.directions.sum(1) * num_points * num_points)
        self.metrics["distill_pair_share"] = shares.float().mean().detach()
        return per_pair.mean()


class _PairView(NamedTuple):
    """What both losses need of the batch, at the mask-feature size (``hw = h * w``)."""

    pairs: Tensor  # P x 2 batch indices
    is_self: Tensor  # P, pair (b, b)
    directions: Tensor  # P x 2, which of the two pairing directions count
    labels: Tensor  # B x hw
    pad: Tensor  # B x hw
    base: Tensor  # B x hw
    h: int
    w: int


def _share_self(index: Tensor, is_self: Tensor) -> Tensor:
    """Self pairs use one set of points on both sides (``index`` ``P x 2 x J``)."""
    return torch.stack([index[:, 0], torch.where(is_self[:, None], index[:, 0], index[:, 1])], dim=1)
