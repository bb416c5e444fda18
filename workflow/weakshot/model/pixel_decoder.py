"""MaskFormer's ``BasePixelDecoder``: a light FPN that turns res2..res5 into per-pixel embeddings.

Top-down pass from the coarsest map: res5 goes through a 3x3 output conv (it has no lateral, as in MaskFormer);
each finer level adds its 1x1 lateral projection to the nearest-upsampled coarser result and passes the sum
through its own 3x3 output conv (+ GroupNorm + ReLU). A final 3x3 conv (no norm, no activation: these are
embeddings, dotted with the query mask embeddings) gives ``mask_features`` at the finest (res2) stride.
SimFormer also uses these ``mask_features`` as the pixel embeddings of its pixel-pixel similarity branch.

GroupNorm gets ``gcd(norm_groups, conv_dim)`` groups so narrow embedded-scale settings stay valid; with the
paper's 256 channels and 32 groups that is 32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from weakshot.model.backbone import group_norm


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """detectron2's ``c2_xavier_fill``: Caffe2's "XavierFill" is uniform with gain 1 over fan_in,
    i.e. kaiming_uniform with a=1; biases start at 0."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _conv_norm(in_ch: int, out_ch: int, kernel: int, groups: int, relu: bool) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)  # the norm carries the shift
    c2_xavier_fill(conv)
    layers: list[nn.Module] = [conv, group_norm(out_ch, groups)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PixelDecoder(nn.Module):
    """FPN over ``in_channels`` (feature name -> channels, ordered fine to coarse, e.g. res2..res5)."""

    def __init__(self, in_channels: Mapping[str, int], conv_dim: int, mask_dim: int, norm_groups: int) -> None:
        super().__init__()
        self.in_features = list(in_channels)
        top = self.in_features[-1]
        self.lateral = nn.ModuleDict()
        self.output = nn.ModuleDict()
        for name, channels in in_channels.items():
            if name == top:
                self.output[name] = _conv_norm(channels, conv_dim, 3, norm_groups, relu=True)
            else:
                self.lateral[name] = _conv_norm(channels, conv_dim, 1, norm_groups, relu=False)
                self.output[name] = _conv_norm(conv_dim, conv_dim, 3, norm_groups, relu=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Returns ``mask_features``: B x mask_dim x H/s x W/s with s the stride of the finest input."""
        top = self.in_features[-1]
        y = self.output[top](features[top])
        for name in reversed(self.in_features[:-1]):
            lateral = self.lateral[name](features[name])
            # size= (not scale_factor=2) keeps odd-sized maps aligned, as MaskFormer does.
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.output[name](y)
        return self.mask_features(y)
