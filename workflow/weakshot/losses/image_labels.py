"""Multi-label BCE on image-level labels, the loss of the CAM classifier (``method.supervision: image``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImageLabelLoss(nn.Module):
    """BCE of the pooled class logits against the classes present in each (augmented) training crop.

    ``pos_weight`` lifts the positives: an image holds ~10 % of the classes, and with plain BCE the logits of
    present classes stay under 0 for a long time (the calibration study's finding), which makes CAMs of the
    rarer classes flat.
    """

    weight_dict = {"loss_image": 1.0}

    def __init__(self, num_classes: int, pos_weight: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("pos_weight", torch.full((num_classes,), float(pos_weight)), persistent=False)

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        logits = outputs["image_logits"].float()
        targets = torch.zeros_like(logits)
        for row, target in enumerate(batch["targets"]):
            targets[row, target["labels"]] = 1.0
        loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)
        return {"loss_image": loss}
