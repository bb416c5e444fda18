"""Typed run configuration, loaded from YAML.

One dataclass per concern (model, losses, pixel similarity, data augmentation, training); a run is a
``RunConfig`` holding them all. ``RunConfig.from_dict`` rejects unknown keys and names the offending key
with its full dotted path, so a typo in a YAML file fails before any work starts. The resolved config is
saved beside every trained model (``to_dict``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 50  # 18/34 use BasicBlock, 50/101 Bottleneck (torchvision names)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)  # stage widths before the bottleneck expansion
    blocks: tuple[int, int, int, int] | None = None  # blocks per stage; None = the standard count of `depth`
    stem: str = "imagenet"  # "imagenet": 7x7/2 conv + 3x3/2 max-pool (stride 4); "small": 3x3/2 conv (stride 2)
    norm: str = "frozen_bn"  # "frozen_bn" (detectron2's default for R-50), "bn" or "gn"
    weights: str | None = None  # path of torchvision ImageNet weights (a state dict .pth), or None


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    conv_dim: int = 256  # FPN channels
    mask_dim: int = 256  # pixel-embedding channels (mask_features)
    norm_groups: int = 32  # GroupNorm groups in the pixel decoder
    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    deep_supervision: bool = True
    # The decoder's memory (MaskFormer's TRANSFORMER_IN_FEATURE): "res5" (the paper) or "pixel_embedding"
    # (mask_features). On tiny images res5 is 2x2 or 4x4 cells that each mix several classes, so the queries
    # cannot read a class off one region; the stride-2 pixel embedding keeps them apart.
    transformer_in_feature: str = "res5"
    # Mask2Former's masked attention (Cheng et al. 2022): each decoder layer attends only inside the masks the
    # previous layer predicts. Off in MaskFormer and the paper; see README for why the embedded scale uses it.
    masked_attention: bool = False
    # Mask2Former's learnable query features: the decoder starts from a learned embedding instead of zeros, and
    # the heads predict from it before the first layer (one more supervised output, and with masked attention
    # the first layer's mask). Off in MaskFormer and the paper.
    query_features: bool = False
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0-255
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class LossConfig:
    class_weight: float = 1.0
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    no_object_weight: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Matcher costs (all released SimFormer configs use 1 for the class terms).
    cost_class: float = 1.0
    cost_focal: float = 20.0
    cost_dice: float = 1.0
    complementary_weight: float = 0.0  # lambda_comp: 0.15 COCO, 0.2 ADE, 0 for Basic Model and retraining
    complementary_floor: float = -2.9444  # logit of the constant "ignore proposal" (sigmoid = 0.05)
    # Leave pixels labelled 255 out of the mask losses (MaskFormer: a negative of every mask). For training on
    # pseudo-labels, whose 255 pixels are "not known", mostly unlabelled novel pixels (README, Table 3).
    mask_ignore_unlabelled: bool = False
    affinity_radius: int = 5  # RETAB: pixel pairs within this radius (feature-map pixels) train the affinity
    image_pos_weight: float = 5.0  # CAM classifier: BCE weight of present classes (about 1/10 of all classes)


@dataclass(frozen=True)
class SimilarityConfig:
    pairing: str = "none"  # "none" (no pixel-pixel transfer), "self" (pairs within an image), "cross"
    base_points: int = 100  # J: sampled points per image for SimNet training
    novel_points: int = 100  # J for distillation
    positive_fraction: float = 0.8  # share of base points drawn in the shared positive class
    sim_weight: float = 1.0
    distill_weight: float = 0.1  # 0.1 COCO, 0.5 ADE
    distill_loss: str = "cce"  # "ce" or "cce"
    # DistLoss on pairs of points inside the non-base region only; false: SimFormer, whose sampler tops a small
    # region up with base pixels and distils on them too (losses/pixel_similarity.py, README quirk table).
    distill_region_only: bool = True
    simnet_width: int = 256
    simnet_blocks: int = 3
    balance_window: int = 25  # iterations of pair counts behind the class-balanced BCE weights


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int = 640
    min_scale: float = 0.5  # scale jitter relative to the dataset's test size
    max_scale: float = 2.0
    flip: bool = True
    color_jitter: bool = True
    test_size: int = 640  # shortest edge at test time
    crop_retries: int = 50  # re-draw a crop that contains no labelled class


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 60000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_multiplier: float = 0.1
    poly_power: float = 0.9
    # Linear warm-up of the learning rate over the first iterations (0 = none, as MaskFormer and SimFormer).
    warmup_iters: int = 0
    clip_grad_norm: float = 0.01
    amp: str = "bf16"  # "bf16", "fp16" or "off"; only used on CUDA
    channels_last: bool = True  # CUDA only
    num_workers: int = 2
    checkpoint_every: int = 1000
    log_every: int = 20
    seed: int = 6
    deterministic: bool = True  # deterministic kernels on CPU (a resumed run reproduces an uninterrupted one)


@dataclass(frozen=True)
class MethodConfig:
    # What the training images tell the model: "full" = every class with its mask (FullyOracle, and the
    # retraining on pseudo-labels); "base" = base classes only (the base model); "weak" = base masks plus
    # image-level labels of the novel classes (SimFormer and its variants); "image" = image-level labels of
    # every class, no masks (the CAM classifier of the RETAB and WSSS baselines); "retab" = base masks only,
    # for RETAB's affinity and boundary networks.
    supervision: str = "weak"
    # Initialisation: "imagenet" = backbone from model.backbone.weights (the paper: every model starts
    # from ImageNet R-50); "base_model" = the whole network from the split's trained base model.
    init: str = "imagenet"
    # Retraining (the "*" rows): the method whose pseudo-labels of the training images this model trains on,
    # with `supervision: full`. The workflow passes that method's pseudo-label folder of the same split.
    pseudo_labels: str | None = None


@dataclass(frozen=True)
class RunConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "config") -> RunConfig:
        return _build(cls, data or {}, where)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` laid over ``base``, recursing into mappings: how a method's settings overlay the shared
    ``training`` settings of the workflow config (rules/common.smk has the same rule, without importing us)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Fields that take one of a few words; checked when a config is loaded, so a typo fails before training.
CHOICES: dict[str, tuple[str, ...]] = {
    "method.supervision": ("full", "base", "weak", "image", "retab"),
    "method.init": ("imagenet", "base_model"),
    "model.backbone.stem": ("imagenet", "small"),
    "model.backbone.norm": ("frozen_bn", "bn", "gn"),
    "model.transformer_in_feature": ("res5", "pixel_embedding"),
    "similarity.pairing": ("none", "self", "cross"),
    "similarity.distill_loss": ("ce", "cce"),
    "train.amp": ("bf16", "fp16", "off"),
}


def _plain(value: Any) -> Any:
    """Tuples to lists, so the resolved config is plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    for name, value in values.items():
        choices = CHOICES.get(f"{where}.{name}".partition(".")[2])
        if choices is not None and value not in choices:
            raise ValueError(f"{where}.{name}: {value!r} is not one of {', '.join(choices)}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value
