"""Losses of RETAB's transfer networks, learnt on base masks only (``method.supervision: retab``).

Both read the *weak* label map (novel pixels are 255, like unlabelled ones), nearest-downsampled to the network's
stride, so nothing of the novel classes is seen.

- **Affinity** (PSA/RETAB): for every pair of labelled pixels within ``radius``, ``a = exp(-mean|f_i - f_j|)``;
  positives (same class) pay ``-log a``, negatives ``-log(1 - a)``; the loss is ``1/2 mean_pos + 1/2 mean_neg``.
  RETAB splits positives into background and foreground (1/4 each); there is no background class here. The
  affinity is symmetric, so each unordered pair is taken once (the means are those over both orders), by
  shifting the feature map against itself once per offset: no gathers, and a backward of plain slice adds.
- **Boundary** (RETAB, with a target RETAB takes from VOC's void band): a pixel is a boundary pixel when its
  3 x 3 neighbourhood holds two different values, counting 255 as one (the border between a base region and
  anything else is a class border); a pixel whose neighbourhood is one base class is a non-boundary pixel; a
  pixel whose neighbourhood is all 255 is not trained (novel-novel borders are unknown). Loss: mean BCE over
  boundary pixels + mean BCE over non-boundary pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weakshot.data.classes import IGNORE_LABEL
from weakshot.losses.criterion import local_count_share


def half_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) within Euclidean distance ``radius``, one of each +-(dy, dx) pair (dy > 0, or dy == 0
    and dx > 0): every unordered neighbour pair of a grid is (p, p + offset) for exactly one of them."""
    return [
        (dy, dx)
        for dy in range(0, radius + 1)
        for dx in range(-radius, radius + 1)
        if (dy > 0 or dx > 0) and dy * dy + dx * dx <= radius * radius
    ]


def shifted_pair(x: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(x[..., p], x[..., p + (dy, dx)])`` over every grid position ``p`` whose partner is inside
    (``dy >= 0``); the last two dimensions are the grid."""
    h, w = x.shape[-2:]
    left, right = max(0, -dx), w - max(0, dx)
    return x[..., : h - dy, left:right], x[..., dy:, left + dx : right + dx]


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of B x H x W integer labels."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def boundary_targets(labels: torch.Tensor) -> torch.Tensor:
    """B x h x w float targets: 1 boundary, 0 non-boundary, -1 not trained (see module docstring)."""
    padded = F.pad(labels[:, None].float(), (1, 1, 1, 1), mode="replicate")
    window = F.unfold(padded, 3)  # B x 9 x (h*w)
    differs = (window.amax(1) != window.amin(1)).view_as(labels)
    all_unknown = (window == IGNORE_LABEL).all(1).view_as(labels)
    target = differs.float()
    target[all_unknown] = -1.0
    return target


class RetabLoss(nn.Module):
    weight_dict = {"loss_affinity": 1.0, "loss_boundary": 1.0}

    def __init__(self, radius: int) -> None:
        super().__init__()
        self.radius = radius
        # The criterion's count_share hook (World.count_share in a multi-GPU job): pair and pixel counts of
        # the global batch, so each term is its mean however the batch is split over ranks.
        self.count_share = local_count_share

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        features = outputs["affinity_features"].float()
        b, _, h, w = features.shape
        labels = downsample_labels(batch["labels"], (h, w))

        distances, firsts, seconds = [], [], []
        for dy, dx in half_offsets(self.radius):
            if dy >= h or abs(dx) >= w:
                continue
            f_first, f_second = shifted_pair(features, dy, dx)
            distances.append((f_first - f_second).abs().mean(1).flatten(1))
            l_first, l_second = shifted_pair(labels, dy, dx)
            firsts.append(l_first.flatten(1))
            seconds.append(l_second.flatten(1))
        affinity = torch.exp(-torch.cat(distances, 1))  # B x (unordered pairs)
        first, second = torch.cat(firsts, 1), torch.cat(seconds, 1)
        valid = (first != IGNORE_LABEL) & (second != IGNORE_LABEL)
        positive = valid & (first == second)
        negative = valid & (first != second)
        eps = 1e-5
        boundary = boundary_targets(labels)
        logits = outputs["boundary_logits"].float()
        bce = F.binary_cross_entropy_with_logits(logits, boundary.clamp(min=0), reduction="none")
        on, off = boundary == 1, boundary == 0
        counts = torch.stack([positive.sum(), negative.sum(), on.sum(), off.sum()]).float()
        n_pos, n_neg, n_on, n_off = self.count_share(counts, torch.ones_like(counts)).unbind()
        # Sums by where() rather than boolean indexing: no host sync.
        pos_loss = -torch.where(positive, (affinity + eps).log(), 0.0).sum() / n_pos
        neg_loss = -torch.where(negative, (1 - affinity + eps).log(), 0.0).sum() / n_neg
        boundary_loss = torch.where(on, bce, 0.0).sum() / n_on + torch.where(off, bce, 0.0).sum() / n_off
        return {"loss_affinity": 0.5 * pos_loss + 0.5 * neg_loss, "loss_boundary": boundary_loss}
