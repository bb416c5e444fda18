"""Hungarian matching of queries to targets: MaskFormer's matcher with SimFormer's weak-shot rule.

Every target (a class present in the crop) must be claimed by exactly one query. The cost of giving target
``t`` to query ``q`` is

    C[q, t] = -cost_class * softmax(logits_q)[label_t]
              + has_mask_t * (cost_focal * focal(q, t) + cost_dice * dice(q, t))

Novel classes of a weak-shot run only come as image-level labels (``has_mask`` False, an all-False mask), so
they are matched on the class probability alone; a mask term against an empty mask would pull them towards
queries that predict nothing (SimFormer: ``ASM.NoMaskMask 0``). The mask terms are evaluated at the
prediction's resolution (stride 4) with the target masks nearest-downsampled, as MaskFormer does: matching
at full resolution would cost 16x more for the same decision.

Cost matrices of all images are built in one batched computation on the model's device, and those of all
decoder layers (:meth:`HungarianMatcher.match_layers`) are copied to the host together: at paper scale the
per-image loop with a device->host copy each is a known bottleneck of MaskFormer's matcher. Targets are
padded to the largest per-image count; the padded columns are sliced off on the host before solving.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from weakshot.config import LossConfig

# Per image: (query indices, target indices), int64 CPU tensors of equal length, query indices ascending.
Indices = list[tuple[Tensor, Tensor]]


def nearest_downsample(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize masks ``[..., H, W]`` to ``size`` exactly like ``F.interpolate(mode="nearest")``.

    For an integer ratio nearest interpolation picks pixel ``i * s``, i.e. a strided view: no float copy of
    the full-resolution masks is made (they are ``T x 640 x 640`` per image at paper scale).
    """
    height, width = masks.shape[-2:]
    h, w = size
    if height % h == 0 and width % w == 0:
        return masks[..., :: height // h, :: width // w]
    flat = masks.reshape(-1, 1, height, width).float()
    out = F.interpolate(flat, size=(h, w), mode="nearest")
    return out.reshape(*masks.shape[:-2], h, w).to(masks.dtype)


def pairwise_focal_cost(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss averaged over pixels for every (prediction, target) pair.

    ``logits`` ``[..., Q, P]``, ``targets`` ``[..., T, P]`` (0/1 floats; leading dims broadcast) ->
    ``[..., Q, T]``. The per-pixel loss is ``pos`` where the target is 1 and ``neg`` where it is 0, so the
    pixel sum is ``sum(neg) + (pos - neg) @ t``: one matrix product instead of a ``Q x T x P`` tensor.
    """
    prob = logits.sigmoid()
    pos = alpha * (1 - prob).pow(gamma) * F.softplus(-logits)  # BCE(x, 1) = softplus(-x)
    neg = (1 - alpha) * prob.pow(gamma) * F.softplus(logits)  # BCE(x, 0) = softplus(x)
    cost = neg.sum(-1, keepdim=True) + (pos - neg) @ targets.transpose(-1, -2)
    return cost / logits.shape[-1]


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss (+1 smoothing) on sigmoid probabilities for every (prediction, target) pair.

    Same shapes as :func:`pairwise_focal_cost`.
    """
    prob = logits.sigmoid()
    intersection = prob @ targets.transpose(-1, -2)
    denominator = prob.sum(-1).unsqueeze(-1) + targets.sum(-1).unsqueeze(-2)
    return 1 - (2 * intersection + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of targets to queries by minimal total cost (see the module docstring)."""

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_focal: float = 20.0,
        cost_dice: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_focal = cost_focal
        self.cost_dice = cost_dice
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg: LossConfig) -> HungarianMatcher:
        return cls(cfg.cost_class, cfg.cost_focal, cfg.cost_dice, cfg.focal_alpha, cfg.focal_gamma)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Indices:
        """Match one decoder layer: ``outputs`` has ``pred_logits`` B x Q x (K+1) and ``pred_masks``
        B x Q x h x w; ``targets`` is the batch's per-image list (``labels``, ``masks``, ``has_mask``)."""
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> list[Indices]:
        """Match several decoder layers (final + auxiliary) of the same batch with one device->host copy.

        The layers' costs are computed one after the other (peak memory of one layer: ~0.5 GB for 8 images
        of 160 x 160 masks) but copied to the host together.
        """
        sizes = [int(t["labels"].shape[0]) for t in targets]
        padded = self._pad_targets(targets, layers[0]["pred_masks"].shape[-2:], layers[0]["pred_logits"].device)
        costs = torch.stack(
            [self._costs(layer["pred_logits"], layer["pred_masks"], *padded) for layer in layers]
        ).cpu()  # the one host transfer

        empty = torch.empty(0, dtype=torch.long)
        result: list[Indices] = []
        for layer_costs in costs:
            per_image: Indices = []
            for b, n in enumerate(sizes):
                if n == 0:
                    per_image.append((empty, empty))
                    continue
                cost = layer_costs[b, :, :n].numpy()
                if not np.isfinite(cost).all():
                    raise FloatingPointError("non-finite matching cost (NaN/inf model outputs: diverged?)")
                rows, cols = linear_sum_assignment(cost)
                per_image.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
            result.append(per_image)
        return result

    @torch.no_grad()
    def cost_matrices(self, pred_logits: Tensor, pred_masks: Tensor, targets: Sequence[dict[str, Tensor]]) -> Tensor:
        """Costs ``B x Q x Tmax`` (on the predictions' device) for ``pred_logits`` B x Q x (K+1) and
        ``pred_masks`` B x Q x h x w. Column ``t`` of image ``b`` is meaningful for ``t < T_b`` only."""
        padded = self._pad_targets(targets, pred_masks.shape[-2:], pred_logits.device)
        return self._costs(pred_logits, pred_masks, *padded)

    @staticmethod
    def _pad_targets(
        targets: Sequence[dict[str, Tensor]], size: tuple[int, int], device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Labels ``B x Tmax``, has_mask ``B x Tmax`` and masks ``B x Tmax x hw`` (float, at the prediction
        resolution), padded with label 0 / no mask / empty mask: the padded columns are discarded later."""
        h, w = size
        sizes = [int(t["labels"].shape[0]) for t in targets]
        tmax = max(sizes, default=0)
        labels = torch.zeros(len(targets), tmax, dtype=torch.long, device=device)
        has_mask = torch.zeros(len(targets), tmax, dtype=torch.bool, device=device)
        masks = torch.zeros(len(targets), tmax, h * w, dtype=torch.float32, device=device)
        for b, (t, n) in enumerate(zip(targets, sizes)):
            if n == 0:
                continue
            labels[b, :n] = t["labels"]
            has_mask[b, :n] = t["has_mask"]
            masks[b, :n] = nearest_downsample(t["masks"], (h, w)).flatten(1)
        return labels, has_mask, masks

    def _costs(
        self, pred_logits: Tensor, pred_masks: Tensor, labels: Tensor, has_mask: Tensor, masks: Tensor
    ) -> Tensor:
        num_images, num_queries, _ = pred_logits.shape
        if labels.shape[0] != num_images:
            raise ValueError(f"{labels.shape[0]} target dicts for a batch of {num_images} images")
        tmax = labels.shape[1]
        # Costs in fp32 even when the model ran under autocast: bf16 matrix products over ~25k pixels would
        # blur cost differences and change assignments.
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            prob = pred_logits.float().softmax(-1)
            cost_class = -prob.gather(-1, labels[:, None, :].expand(num_images, num_queries, tmax))
            if tmax == 0:
                return cost_class
            logits = pred_masks.float().flatten(-2)  # B x Q x hw
            cost_mask = self.cost_focal * pairwise_focal_cost(
                logits, masks, self.focal_alpha, self.focal_gamma
            ) + self.cost_dice * pairwise_dice_cost(logits, masks)
            cost_mask = torch.where(has_mask[:, None, :], cost_mask, torch.zeros_like(cost_mask))
            return self.cost_class * cost_class + cost_mask
