"""The image-level classifier behind class activation maps (CAM), for the RETAB and WSSS baselines.

The same ResNet and FPN pixel decoder as the segmenter, then a bias-free 1x1 convolution to one score map per
class; global average pooling of the maps gives the image-level logits (Zhou et al.'s CAM, in the "score maps
first, pool second" form, which makes the pooled logit exactly the mean of the class map). The FPN keeps the
maps at the pixel decoder's stride (2 with the small stem), where res5 alone would give 2x2 cells on the
embedded 32 px images.

Trained with multi-label BCE on the image-level labels of *every* class (`method.supervision: image`): the
weak-shot setting gives image-level labels of all classes in every training image, so one classifier serves
every split of a dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weakshot.config import ModelConfig
from weakshot.model.backbone import PixelNormalisation, ResNet
from weakshot.model.pixel_decoder import PixelDecoder


class CamClassifier(nn.Module):
    description = "CAM classifier"

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = ResNet(cfg.backbone)
        self.pixel_decoder = PixelDecoder(self.backbone.out_channels, cfg.conv_dim, cfg.mask_dim, cfg.norm_groups)
        self.classifier = nn.Conv2d(cfg.mask_dim, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)
        self.normalise = PixelNormalisation(cfg.pixel_mean, cfg.pixel_std)

    def forward(self, images: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict:
        """``images`` B x 3 x H x W (RGB 0..255); ``pad_mask`` B x H x W (True on padding) keeps padding out of
        the pooled logits. Returns ``cams`` B x K x h x w (class score maps) and ``image_logits`` B x K."""
        x = self.normalise(images)
        cams = self.classifier(self.pixel_decoder(self.backbone(x)))
        if pad_mask is None:
            return {"cams": cams, "image_logits": cams.mean((2, 3))}
        content = (~F.interpolate(pad_mask[:, None].float(), size=cams.shape[-2:], mode="nearest").bool()).float()
        logits = (cams * content).sum((2, 3)) / content.sum((2, 3)).clamp(min=1)
        return {"cams": cams, "image_logits": logits}


def normalised_cams(cams: torch.Tensor, class_ids: Sequence[int]) -> torch.Tensor:
    """PSA/RETAB's CAM normalisation of the classes the image-level labels name: ReLU, each class map divided
    by its maximum (+1e-5). ``cams`` K x h x w -> len(class_ids) x h x w in [0, 1)."""
    maps = F.relu(cams[list(class_ids)])
    return maps / (maps.flatten(1).amax(1)[:, None, None] + 1e-5)
