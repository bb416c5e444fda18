"""Normalised sine positional encoding of a feature map (DETR's ``PositionEmbeddingSine``).

The transformer decoder's cross-attention has no notion of where a res5 cell lies; this encoding adds it to
the attention keys. Each axis gets ``num_pos_feats`` channels: the cell's 1-based row (column) index divided
by the number of rows (columns) and scaled to (0, 2*pi], then fed through sines and cosines of geometrically
spaced frequencies ``temperature ** (2*floor(i/2) / num_pos_feats)``. Channels are ``[y..., x...]``, and within
each axis sine and cosine alternate.

MaskFormer calls it without a padding mask, so padded cells are encoded like real ones; we do the same,
which makes the encoding depend only on the map's height and width.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sine/cosine pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: B x C x H x W (only its shape, device and dtype are used). Returns B x 2F x H x W."""
        b, _, h, w = x.shape
        eps = 1e-6  # DETR's guard against a zero denominator
        y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32) / (h + eps) * self.scale
        x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32) / (w + eps) * self.scale
        i = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = _sin_cos(y_embed[:, None] / dim_t)  # H x F
        pos_x = _sin_cos(x_embed[:, None] / dim_t)  # W x F
        pos = torch.cat([pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)], dim=-1)  # H x W x 2F
        return pos.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype)


def _sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` angles -> sine on even channels, cosine on odd ones (interleaved, as DETR)."""
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)
