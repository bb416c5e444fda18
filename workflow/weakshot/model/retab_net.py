"""RETAB's two transfer networks, adapted to the weak-shot setting of this project (every image has base masks).

RETAB (Chen et al., "Weak-shot Semantic Segmentation by Transferring Semantic Affinity and Boundary") learns
on base classes two class-agnostic things that transfer to novel classes:

- **semantic affinity**: a feature map ``f`` such that ``a_ij = exp(-mean_c |f_i - f_j|)`` is high for two nearby
  pixels of the same class and low across classes (PSA's AffinityNet);
- **boundary**: a per-pixel logit that is high on the border between two classes.

Adaptation choice: RETAB trains two ResNet-38 networks; here one backbone + FPN (the segmenter's) carries both
heads and is trained once per split, on the base masks only (novel pixels are 255 in its labels, as for every
weak-shot model). Both heads work at the pixel decoder's stride (2 at the embedded scale, where RETAB uses 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weakshot.config import ModelConfig
from weakshot.model.backbone import PixelNormalisation, ResNet
from weakshot.model.pixel_decoder import PixelDecoder


class RetabNet(nn.Module):
    description = "RETAB network"

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = ResNet(cfg.backbone)
        self.pixel_decoder = PixelDecoder(self.backbone.out_channels, cfg.conv_dim, cfg.mask_dim, cfg.norm_groups)
        self.affinity_head = nn.Sequential(nn.Conv2d(cfg.mask_dim, cfg.mask_dim, 1), nn.ELU())
        self.boundary_head = nn.Conv2d(cfg.mask_dim, 1, 1)
        self.normalise = PixelNormalisation(cfg.pixel_mean, cfg.pixel_std)

    @property
    def stride(self) -> int:
        return self.backbone.out_strides[self.pixel_decoder.in_features[0]]

    def forward(self, images: torch.Tensor) -> dict:
        """``images`` B x 3 x H x W (RGB 0..255). Returns ``affinity_features`` B x C x H/s x W/s and
        ``boundary_logits`` B x H/s x W/s."""
        x = self.normalise(images)
        features = F.relu(self.pixel_decoder(self.backbone(x)))
        return {
            "affinity_features": self.affinity_head(features),
            "boundary_logits": self.boundary_head(features)[:, 0],
        }
