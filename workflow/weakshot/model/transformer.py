"""DETR's transformer decoder (post-norm), the only transformer part MaskFormer uses (ENC_LAYERS 0).

Each layer: self-attention among the queries, cross-attention from the queries to the projected res5
memory, then a ReLU feed-forward block; every sub-block is residual and followed by its LayerNorm
(PRE_NORM False). The learned query embedding is added to queries and keys of both attentions (never to
values), the sine position encoding to the memory keys. The decoder starts from zeros, so the queries carry
all query identity through ``query_pos``.

The output of *every* layer goes through one shared final LayerNorm and is returned, so the predictor can
attach heads to each for deep supervision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)  # inside the FFN
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """``tgt``, ``query_pos``: B x Q x C; ``memory``, ``pos``: B x S x C."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class TransformerDecoder(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_layers: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"hidden_dim {d_model} must be divisible by num_heads {num_heads}")
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        # DETR's Transformer._reset_parameters: Xavier-uniform for every matrix (LayerNorms stay 1/0).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """``memory``, ``pos``: B x S x C; ``query_pos``: B x Q x C. Returns L x B x Q x C (normalised
        output of every layer, last layer last)."""
        tgt = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)
