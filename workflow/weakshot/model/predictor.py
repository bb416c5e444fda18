"""MaskFormer's transformer predictor: queries -> class logits and mask logits.

res5 (or, with ``transformer_in_feature: pixel_embedding``, the pixel decoder's mask_features) is projected
to ``hidden_dim`` by a 1x1 conv and flattened into the decoder's memory. ``num_queries`` learned embeddings
attend to it through the DETR decoder. From each query's output, a linear head gives K+1 class logits (the
last is "no object") and a 3-layer MLP gives a mask embedding, whose dot product with every pixel embedding
of ``mask_features`` is the query's mask logit map. With deep supervision the same heads are applied to every
decoder layer's output (shared weights, as MaskFormer/DETR), giving ``aux_outputs`` for the intermediate
layers. With ``query_features`` (Mask2Former) the decoder starts from a second learned embedding per query, and
the heads' prediction from it comes first in ``aux_outputs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weakshot.model.pixel_decoder import c2_xavier_fill
from weakshot.model.position_encoding import PositionEmbeddingSine
from weakshot.model.transformer import TransformerDecoder


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TransformerPredictor(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        num_heads: int,
        dec_layers: int,
        dim_feedforward: int,
        dropout: float,
        mask_dim: int,
        deep_supervision: bool,
        masked_attention: bool = False,
        query_features: bool = False,
    ) -> None:
        super().__init__()
        self.masked_attention = masked_attention
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (half sine, half cosine position channels), got {hidden_dim}")
        self.deep_supervision = deep_supervision
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, 1)
        c2_xavier_fill(self.input_proj)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim) if query_features else None
        self.decoder = TransformerDecoder(hidden_dim, num_heads, dec_layers, dim_feedforward, dropout)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, memory_map: torch.Tensor, mask_features: torch.Tensor) -> dict:
        """``memory_map``: B x C x h' x w' (res5 or mask_features); ``mask_features``: B x mask_dim x h x w.

        Returns ``pred_logits`` B x Q x (K+1), ``pred_masks`` B x Q x h x w (logits) and ``aux_outputs``
        (one dict per intermediate layer, first layer first; empty without deep supervision).
        """
        b = memory_map.shape[0]
        pos = self.pe_layer(memory_map).flatten(2).transpose(1, 2)  # B x S x C
        memory = self.input_proj(memory_map).flatten(2).transpose(1, 2)  # B x S x C
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        mask_of = None
        if self.masked_attention:
            grid = F.interpolate(mask_features, size=memory_map.shape[-2:], mode="bilinear", align_corners=False)
            grid = grid.flatten(2)  # B x mask_dim x S: the mask features at the memory's positions

            def mask_of(states: torch.Tensor) -> torch.Tensor:
                return torch.einsum("bqc,bcs->bqs", self.mask_embed(states), grid)

        initial = None if self.query_feat is None else self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        hs = self.decoder(memory, pos.to(memory.dtype), query_pos, mask_of, initial)  # L x B x Q x C
        if not self.deep_supervision:
            hs = hs[-1:]  # heads on the last layer only: skip the unused mask einsums
        logits = self.class_embed(hs)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)
        return {
            "pred_logits": logits[-1],
            "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": a, "pred_masks": m} for a, m in zip(logits[:-1], masks[:-1])],
        }
