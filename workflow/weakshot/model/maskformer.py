"""MaskFormer (Cheng et al. 2021) as SimFormer uses it: ResNet + FPN pixel decoder + transformer predictor.

The model takes raw RGB images (0..255, padded to a multiple of 32) and normalises them itself, so data
loading never needs to know the backbone's statistics. Losses, matching and SimFormer's additions live
elsewhere; this file also holds the pieces that belong to the model's outputs rather than to training:
semantic inference, detectron2's ``sem_seg_postprocess`` and the AdamW parameter groups of MaskFormer's
``build_optimizer``.

ImageNet weights are not loaded here: the training stage calls
``load_torchvision_weights(model.backbone, cfg.backbone.weights)`` when it starts from ImageNet, so building
a model (for evaluation, or to load a full checkpoint) never needs the weights file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weakshot.config import ModelConfig
from weakshot.model.backbone import FrozenBatchNorm2d, PixelNormalisation, ResNet
from weakshot.model.pixel_decoder import PixelDecoder
from weakshot.model.predictor import TransformerPredictor

Size = tuple[int, int]


class MaskFormer(nn.Module):
    description = "MaskFormer segmenter"

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = ResNet(cfg.backbone)
        self.pixel_decoder = PixelDecoder(self.backbone.out_channels, cfg.conv_dim, cfg.mask_dim, cfg.norm_groups)
        self.transformer_in_feature = cfg.transformer_in_feature
        self.predictor = TransformerPredictor(
            in_channels=(
                cfg.mask_dim if cfg.transformer_in_feature == "pixel_embedding" else self.backbone.out_channels["res5"]
            ),
            num_classes=num_classes,
            hidden_dim=cfg.hidden_dim,
            num_queries=cfg.num_queries,
            num_heads=cfg.num_heads,
            dec_layers=cfg.dec_layers,
            dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout,
            mask_dim=cfg.mask_dim,
            deep_supervision=cfg.deep_supervision,
            masked_attention=cfg.masked_attention,
            query_features=cfg.query_features,
        )
        self.normalise = PixelNormalisation(cfg.pixel_mean, cfg.pixel_std)

    @property
    def mask_stride(self) -> int:
        """Stride of ``pred_masks`` / ``mask_features`` relative to the input (4, or 2 with the small stem)."""
        return self.backbone.out_strides[self.pixel_decoder.in_features[0]]

    def forward(self, images: torch.Tensor) -> dict:
        """``images``: B x 3 x H x W float RGB in 0..255, H and W multiples of 32.

        Returns ``pred_logits`` B x Q x (K+1), ``pred_masks`` B x Q x H/s x W/s (logits), ``aux_outputs``
        (intermediate decoder layers) and ``mask_features`` B x mask_dim x H/s x W/s (pixel embeddings).
        """
        x = self.normalise(images)
        features = self.backbone(x)
        mask_features = self.pixel_decoder(features)
        memory = mask_features if self.transformer_in_feature == "pixel_embedding" else features["res5"]
        outputs = self.predictor(memory, mask_features)
        outputs["mask_features"] = mask_features
        return outputs


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``S[c] = sum_q softmax(cls_q)[c] * sigmoid(mask_q)``: B x K x h x w.

    The softmax runs over all K+1 classes and the no-object column is dropped afterwards (not renormalised),
    so a query that is confidently "no object" contributes nearly nothing to any class.
    """
    probs = F.softmax(pred_logits, dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, pred_masks.sigmoid())


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners False, as detectron2) of a C x H x W or B x C x H x W tensor."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.dim() == 3:
        return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def sem_seg_postprocess(result: torch.Tensor, image_size: Size, output_size: Size) -> torch.Tensor:
    """detectron2's ``sem_seg_postprocess``: crop the padded-input-sized ``result`` (C x H x W or B x C x H x W)
    to the unpadded ``image_size`` (h, w), then resize bilinearly to ``output_size`` (the original image).

    Cropping first matters: resizing the padded map would squeeze the padding into the image.
    """
    return _resize(result[..., : image_size[0], : image_size[1]], output_size)


def postprocess(x: torch.Tensor, padded_size: Size, image_size: Size, output_size: Size) -> torch.Tensor:
    """Mask-stride logits or scores (C x h x w or B x C x h x w, one image size for all) -> upsampled to the
    padded input size, cropped to ``image_size``, resized to ``output_size``."""
    return sem_seg_postprocess(_resize(x, padded_size), image_size, output_size)


def segment(
    outputs: dict, padded_size: Size, image_sizes: Sequence[Size], output_sizes: Sequence[Size]
) -> Iterator[torch.Tensor]:
    """Semantic scores (K x H_i x W_i per image, yielded in batch order) from MaskFormer outputs, in SimFormer's
    order: mask *logits* upsampled to the padded input size, then ``semantic_inference``, then crop and resize
    per image.

    Upsampling before the sigmoid (not after) is what MaskFormer/SimFormer do; it changes the scores slightly
    at object boundaries. One image at a time, yielded, keeps the Q x H x W upsampled logits and the K x H x W
    scores of only one image alive, whatever the batch size.
    """
    for i, (image_size, output_size) in enumerate(zip(image_sizes, output_sizes, strict=True)):
        masks = _resize(outputs["pred_masks"][i : i + 1], padded_size)
        result = semantic_inference(outputs["pred_logits"][i : i + 1], masks)[0]
        yield sem_seg_postprocess(result, image_size, output_size)


NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    FrozenBatchNorm2d,
)


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_multiplier: float) -> list[dict]:
    """AdamW parameter groups as MaskFormer's ``build_optimizer``: parameters of any module under a
    ``backbone`` attribute get ``lr * backbone_multiplier``; parameters owned by normalisation layers and by
    ``nn.Embedding`` (the query embeddings) get no weight decay (WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0);
    everything else, biases included, decays.

    Returns up to four groups (``name`` in backbone / backbone_no_decay / head / head_no_decay), each with its
    own ``lr`` and ``weight_decay``; frozen parameters are left out and shared parameters appear once.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        in_backbone = "backbone" in module_name.split(".")
        no_decay = isinstance(module, NORM_TYPES + (nn.Embedding,))
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            groups.setdefault((in_backbone, no_decay), []).append(param)
    result = []
    for (in_backbone, no_decay), params in sorted(groups.items()):
        name = ("backbone" if in_backbone else "head") + ("_no_decay" if no_decay else "")
        result.append(
            {
                "name": name,
                "params": params,
                "lr": lr * backbone_multiplier if in_backbone else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return result
