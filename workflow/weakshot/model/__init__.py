"""MaskFormer in plain PyTorch: ResNet backbone, FPN pixel decoder, DETR-decoder transformer predictor.

One concept per file, as MaskFormer: ``backbone`` (ResNet with torchvision names + weight loading),
``pixel_decoder`` (FPN -> mask_features), ``position_encoding`` (sine), ``transformer`` (decoder layers),
``predictor`` (queries -> class and mask logits), ``maskformer`` (assembly, inference, optimizer groups).
"""

from weakshot.model.backbone import FrozenBatchNorm2d, ResNet, load_torchvision_weights
from weakshot.model.maskformer import (
    MaskFormer,
    param_groups,
    postprocess,
    segment,
    sem_seg_postprocess,
    semantic_inference,
)
from weakshot.model.pixel_decoder import PixelDecoder
from weakshot.model.position_encoding import PositionEmbeddingSine
from weakshot.model.predictor import TransformerPredictor
from weakshot.model.transformer import TransformerDecoder

__all__ = [
    "FrozenBatchNorm2d",
    "MaskFormer",
    "PixelDecoder",
    "PositionEmbeddingSine",
    "ResNet",
    "TransformerDecoder",
    "TransformerPredictor",
    "load_torchvision_weights",
    "param_groups",
    "postprocess",
    "segment",
    "sem_seg_postprocess",
    "semantic_inference",
]
