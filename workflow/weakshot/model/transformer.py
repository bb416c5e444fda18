"""DETR's transformer decoder (post-norm), the only transformer part MaskFormer uses (ENC_LAYERS 0).

Each layer: self-attention among the queries, cross-attention from the queries to the projected res5
memory, then a ReLU feed-forward block; every sub-block is residual and followed by its LayerNorm
(PRE_NORM False). The learned query embedding is added to queries and keys of both attentions (never to
values), the sine position encoding to the memory keys. The decoder starts from zeros, so the queries carry
all query identity through ``query_pos``; with Mask2Former's learned query features it starts from a learned
embedding instead, and their prediction is one more output.

The output of *every* layer goes through one shared final LayerNorm and is returned, so the predictor can
attach heads to each for deep supervision.
"""

from __future__ import annotations

from collections.abc import Callable

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
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tgt``, ``query_pos``: B x Q x C; ``memory``, ``pos``: B x S x C; ``memory_mask`` (B * heads) x Q x S
        bool, True where a query may *not* attend (masked attention)."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, attn_mask=memory_mask, need_weights=False)[0]
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

    def forward(
        self,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        mask_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
        initial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``memory``, ``pos``: B x S x C; ``query_pos``: B x Q x C. Returns L x B x Q x C (normalised
        output of every layer, last layer last; L + 1 outputs with ``initial``).

        ``mask_of`` (masked attention, Mask2Former): maps normalised query states B x Q x C to the B x Q x S
        mask logits they predict over the memory; each layer's cross-attention is then limited to the memory
        positions the previous layer's output predicts as foreground (logit > 0); the first layer attends
        everywhere (its zero-initialised queries all predict the same mask). A query whose mask is empty attends
        everywhere.

        ``initial`` (Mask2Former's learned query features, B x Q x C) replaces the zero start; its normalised
        state is then returned as an extra first output, and with ``mask_of`` it masks the first layer too.
        """
        tgt = torch.zeros_like(query_pos) if initial is None else initial
        outputs = [] if initial is None else [self.norm(initial)]
        for layer in self.layers:
            memory_mask = None
            if mask_of is not None and outputs:
                with torch.no_grad():
                    blocked = mask_of(outputs[-1]) <= 0  # B x Q x S
                    blocked[blocked.all(-1)] = False
                    memory_mask = blocked.repeat_interleave(layer.cross_attn.num_heads, dim=0)
            tgt = layer(tgt, memory, pos, query_pos, memory_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)
