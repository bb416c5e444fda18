"""Set-prediction losses of SimFormer's MaskFormer part: class, mask and complementary losses.

Per decoder layer (final, then every auxiliary layer when deep supervision is on), after Hungarian matching:

* ``loss_ce``: softmax cross-entropy over K+1 classes for every query. A matched query's target is its
  target's class, base **and** novel: this class loss is the only direct supervision novel classes get
  (SimFormer §3.2, "proposal-pixel similarity transfer"); unmatched queries are no-object, weighted by
  ``no_object_weight``.
* ``loss_focal`` / ``loss_dice``: mask losses for matched targets that carry a mask (base classes). Novel
  targets have only an image-level label and an empty mask; supervising their query's mask with it would
  teach "novel class = nothing", so their pairs are weighted 0 and their masks get no gradient. Prediction
  masks are bilinearly upsampled to the padded input size; both losses are summed over masks and divided by
  ``num_masks`` = the number of mask-carrying targets in the global batch (see ``count_share``). With
  ``mask_ignore_unlabelled`` (the retrains on pseudo-labels) pixels whose label is 255 are left out of both
  mask losses instead of being a negative of every mask, as MaskFormer treats them.
* ``loss_comp`` (SimFormer's CompLoss, §3.3), only when ``complementary_weight > 0``: in each image with a
  novel target, the pixelwise max M of the matched novel queries' mask logits and a constant floor logit
  (``complementary_floor``, sigmoid 0.05; no gradient) should cover exactly the complement of the base
  ground truth, T = 1 - union(base masks), 0 on padding. Per image
  ``focal_weight * focal(M, T) + dice_weight * dice(M, T)`` with num_masks 1, then the mean over the global
  batch's images with novel targets. The focal/dice weights are inside the loss, as in SimFormer's code; the
  weight-dict entry of ``loss_comp`` is ``complementary_weight`` alone (lambda_comp). The floor means pixels
  where every novel mask is below 0.05 receive no gradient.

All losses are returned unweighted; ``SetCriterion.weight_dict`` holds the weights and :func:`total_loss`
combines them. Aux layer ``i`` adds the suffix ``_i`` (``loss_ce_0``, ...), with the same weights.

Host synchronisation: the matcher copies all layers' cost matrices to the host once, and all layers' matched
indices come back to the device in one copy; the loss computation itself has no ``.item()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakshot.config import LossConfig, ModelConfig
from weakshot.data.classes import IGNORE_LABEL
from weakshot.losses.matcher import HungarianMatcher, Indices

# Receives this rank's counts (a float tensor on the loss device: masks, weighted queries, images with a
# novel target) and their lower bounds, and returns what this rank divides its sums by: the global count,
# clamped, divided by the number of ranks (weakshot.engine.distributed.World.count_share). DDP averages the
# ranks' gradients, so every loss is then the mean over the global batch, as one process with the whole
# batch computes it.
CountShare = Callable[[Tensor, Tensor], Tensor]


def local_count_share(counts: Tensor, minimum: Tensor) -> Tensor:
    """One process: the counts themselves, clamped."""
    return torch.maximum(counts, minimum)


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, valid: Tensor | None = None
) -> Tensor:
    """Sigmoid focal loss of each mask, averaged over its pixels (its ``valid`` pixels, a 0/1 map of the same
    shape, when given): ``[N, ...]`` -> ``[N]``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if valid is None:
        return loss.flatten(1).mean(1)
    valid = valid.flatten(1)
    return (loss.flatten(1) * valid).sum(1) / valid.sum(1).clamp(min=1)


def dice_loss(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """Dice loss with +1 smoothing of each mask on sigmoid probabilities (over its ``valid`` pixels when
    given): ``[N, ...]`` -> ``[N]``."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    if valid is not None:
        prob, targets = prob * valid.flatten(1), targets * valid.flatten(1)
    numerator = 2 * (prob * targets).sum(1) + 1
    denominator = prob.sum(1) + targets.sum(1) + 1
    return 1 - numerator / denominator


def complementary_target(targets: Sequence[dict[str, Tensor]], pad_mask: Tensor) -> Tensor:
    """CompLoss target ``B x H x W`` (float): 1 where no base ground truth lies and not padding, else 0.

    Only mask-carrying targets count as "base": a mask-less target's mask is empty anyway, and in runs where
    novel classes carry (pseudo-label) masks the complementary loss is off.
    """
    covered = torch.stack([(t["masks"] & t["has_mask"][:, None, None]).any(0) for t in targets])
    covered = covered.to(pad_mask.device) | pad_mask
    return (~covered).float()


def total_loss(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """Sum of ``weight * loss`` over the losses that have a weight; the others (logging only) are skipped."""
    terms = [weight_dict[name] * value for name, value in losses.items() if name in weight_dict]
    if not terms:
        raise ValueError(f"none of the losses {sorted(losses)} has a weight in the weight dict")
    return sum(terms[1:], terms[0])


class SetCriterion(nn.Module):
    """Matches queries to targets and computes the unweighted losses of every decoder layer.

    ``num_aux_layers`` is the number of auxiliary decoder outputs (``dec_layers - 1``); it fixes the keys of
    ``weight_dict`` up front, and ``forward`` refuses outputs with a different count, so no aux loss can be
    silently left out of the total. ``last_indices`` holds the final layer's matching after each forward.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        loss_cfg: LossConfig,
        deep_supervision: bool,
        *,
        num_aux_layers: int = 5,
        count_share: CountShare = local_count_share,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.cfg = loss_cfg
        self.deep_supervision = deep_supervision
        self.num_aux_layers = num_aux_layers if deep_supervision else 0
        self.count_share = count_share
        self.use_complementary = loss_cfg.complementary_weight > 0
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = loss_cfg.no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

        layer_weights = {
            "loss_ce": loss_cfg.class_weight,
            "loss_focal": loss_cfg.focal_weight,
            "loss_dice": loss_cfg.dice_weight,
        }
        if self.use_complementary:
            layer_weights["loss_comp"] = loss_cfg.complementary_weight
        self.weight_dict: dict[str, float] = dict(layer_weights)
        for i in range(self.num_aux_layers):
            self.weight_dict.update({f"{name}_{i}": weight for name, weight in layer_weights.items()})
        self.last_indices: Indices = []

    def forward(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        targets: list[dict[str, Tensor]] = batch["targets"]
        layers = [outputs]
        if self.deep_supervision:
            aux = list(outputs.get("aux_outputs", []))
            if len(aux) != self.num_aux_layers:
                raise ValueError(f"expected {self.num_aux_layers} aux outputs, got {len(aux)}")
            layers += aux

        device = outputs["pred_logits"].device
        indices = self.matcher.match_layers(layers, targets)
        self.last_indices = indices[0]
        packed = self._pack_indices(indices, [int(t["labels"].shape[0]) for t in targets], device)

        # Targets of the whole batch concatenated, so each layer's matched targets are one gather.
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        has_mask = torch.cat([t["has_mask"] for t in targets]).to(device)
        masks = torch.cat([t["masks"] for t in targets]).to(device)
        # The normalisers, shared over ranks in one collective: mask-carrying targets; the class loss's
        # weighted query count (matched queries weigh 1, the no-object rest no_object_weight; the matcher's
        # indices are on the host, so this costs no sync); images with a novel target (complementary loss).
        num_queries = outputs["pred_logits"].shape[0] * outputs["pred_logits"].shape[1]
        num_matched = sum(len(query) for query, _ in indices[0])
        eos = self.cfg.no_object_weight
        has_novel = torch.stack([(~t["has_mask"]).any() for t in targets]).to(device)
        counts = torch.stack(
            [
                has_mask.sum().float(),
                torch.full((), num_matched + eos * (num_queries - num_matched), device=device),  # no copy
                has_novel.sum().float(),
            ]
        )
        # An empty batch divides by 1 (its sums are 0); the class count is never 0 (no-object queries).
        minimum = torch.tensor([1.0, 1e-6, 1.0], device=device)
        num_masks, class_norm, num_novel = self.count_share(counts, minimum).unbind()

        # Pixels every mask loss reads (B x H x W, 1 = read), or None: all of them.
        valid = (batch["labels"].to(device) != IGNORE_LABEL).float() if self.cfg.mask_ignore_unlabelled else None

        comp = None
        if self.use_complementary:
            comp_target = complementary_target(targets, batch["pad_mask"].to(device))
            comp = (comp_target, has_novel, num_novel)

        losses: dict[str, Tensor] = {}
        for i, (layer, layer_idx) in enumerate(zip(layers, packed)):
            suffix = "" if i == 0 else f"_{i - 1}"
            layer_losses = self._layer_losses(
                layer, layer_idx, labels, has_mask, masks, num_masks, class_norm, comp, valid
            )
            losses.update({name + suffix: value for name, value in layer_losses.items()})
        return losses

    @staticmethod
    def _pack_indices(
        indices: list[Indices], sizes: list[int], device: torch.device
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per layer (image index, query index, index into the batch-concatenated targets) on ``device``.

        All layers go in one host->device copy (pinned and non-blocking on CUDA) instead of one per image.
        """
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        columns, counts = [], []
        for layer in indices:
            count = 0
            for b, (query, target) in enumerate(layer):
                columns.append(torch.stack([torch.full_like(query, b), query, target + offsets[b]]))
                count += len(query)
            counts.append(count)
        flat = torch.cat(columns, dim=1) if columns else torch.empty(3, 0, dtype=torch.long)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        else:
            flat = flat.to(device)
        return [tuple(chunk) for chunk in flat.split(counts, dim=1)]

    def _layer_losses(
        self,
        layer: dict[str, Tensor],
        idx: tuple[Tensor, Tensor, Tensor],
        labels: Tensor,
        has_mask: Tensor,
        masks: Tensor,
        num_masks: Tensor,
        class_norm: Tensor,
        comp: tuple[Tensor, Tensor, Tensor] | None,
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        image_idx, query_idx, target_idx = idx
        logits = layer["pred_logits"].float()
        pred_masks = layer["pred_masks"]

        # Class loss: matched queries take their target's class (base or novel), the others no-object (K).
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        target_classes[image_idx, query_idx] = labels[target_idx]
        empty_weight = self.empty_weight.to(logits.device)
        # The weighted mean over queries (F.cross_entropy's with `weight`), its denominator global.
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=empty_weight, reduction="sum")
        loss_ce = loss_ce / class_norm

        # Mask losses at the padded input size. Novel (mask-less) pairs are computed but weighted 0: masking
        # by weight avoids a host sync that boolean indexing would need, and their gradient is exactly 0.
        size = masks.shape[-2:]
        matched = pred_masks[image_idx, query_idx].float()
        matched = F.interpolate(matched[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        matched_targets = masks[target_idx].float()
        pair_weight = has_mask[target_idx].float()
        matched_valid = None if valid is None else valid[image_idx]
        focal = sigmoid_focal_loss(matched, matched_targets, self.cfg.focal_alpha, self.cfg.focal_gamma, matched_valid)
        dice = dice_loss(matched, matched_targets, matched_valid)
        losses = {
            "loss_ce": loss_ce,
            "loss_focal": (focal * pair_weight).sum() / num_masks,
            "loss_dice": (dice * pair_weight).sum() / num_masks,
        }
        if comp is not None:
            losses["loss_comp"] = self._complementary_loss(pred_masks, matched, image_idx, target_idx, has_mask, *comp)
        return losses

    def _complementary_loss(
        self,
        pred_masks: Tensor,
        matched: Tensor,
        image_idx: Tensor,
        target_idx: Tensor,
        has_mask: Tensor,
        comp_target: Tensor,
        has_novel: Tensor,
        num_novel: Tensor,
    ) -> Tensor:
        num_images, height, width = comp_target.shape
        novel_pair = ~has_mask[target_idx]
        # Base pairs become -inf so they never win the max (and get no gradient); every image starts from the
        # constant floor, which also stands for "no novel query" in images without novel targets.
        candidates = matched.masked_fill(~novel_pair[:, None, None], float("-inf")).flatten(1)
        union = torch.full(
            (num_images, height * width), self.cfg.complementary_floor, dtype=matched.dtype, device=matched.device
        )
        union = union.scatter_reduce(
            0, image_idx[:, None].expand_as(candidates), candidates, reduce="amax", include_self=True
        )
        union = union.view(num_images, height, width)
        per_image = self.cfg.focal_weight * sigmoid_focal_loss(
            union, comp_target, self.cfg.focal_alpha, self.cfg.focal_gamma
        ) + self.cfg.dice_weight * dice_loss(union, comp_target)
        has_novel = has_novel.float()
        loss = (per_image * has_novel).sum() / num_novel
        # Keeps a graph to the predictions when no image has a novel target (DDP expects every step to
        # reach the same parameters; backward() needs a grad_fn).
        return loss + pred_masks.sum() * 0


def build_criterion(
    num_classes: int,
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    count_share: CountShare = local_count_share,
) -> SetCriterion:
    """The criterion of a run: matcher costs from ``loss_cfg``, one aux layer per decoder layer but the last
    (and one for the learned query features' prediction before the first layer)."""
    return SetCriterion(
        num_classes,
        HungarianMatcher.from_config(loss_cfg),
        loss_cfg,
        model_cfg.deep_supervision,
        num_aux_layers=model_cfg.dec_layers - 1 + int(model_cfg.query_features),
        count_share=count_share,
    )
