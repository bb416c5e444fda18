"""ResNet trunk with torchvision's parameter names, returning the res2..res5 feature maps.

SimFormer uses detectron2's ResNet-50 (STRIDE_IN_1X1 False, FREEZE_AT 0, frozen BN) initialised from the
torchvision ImageNet weights. detectron2 with STRIDE_IN_1X1 False puts the stride in the 3x3 conv, exactly as
torchvision's Bottleneck does, so the same network can be written with torchvision's module names
(``conv1``, ``bn1``, ``layer1..4``, ``downsample.0/1``) and load a torchvision ``.pth`` file directly, with no
name conversion step.

Two additions serve the small experiments of this project: a ``small`` stem (one 3x3/2 conv, no max-pool) so
32-96 px images keep enough resolution at res5, and free stage widths / block counts. The norm module of each
block keeps the name ``bn*`` whatever its kind (frozen BN, BN or GroupNorm) so the naming stays fixed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weakshot.config import BackboneConfig

# Standard blocks per stage of each depth (He et al. 2016, Table 1).
STANDARD_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
GN_GROUPS = 32  # detectron2's "GN" norm


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all stored as buffers.

    detectron2 freezes BN in the R-50 trunk because per-GPU batches of 2 images give useless batch statistics.
    Buffers (not parameters) mean the optimizer never sees them and no gradient is computed for them; the
    names match ``nn.BatchNorm2d`` so torchvision weights load unchanged (minus ``num_batches_tracked``, which
    a frozen layer has no use for).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fold into one scale and shift; cast to x's dtype so bf16/fp16 activations under autocast are not
        # promoted to fp32 by the fp32 buffers (that would double activation memory).
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``gcd(groups, channels)`` groups, so narrow layers (e.g. 48 channels, 32 groups asked)
    still get a valid split instead of an error; with the paper's widths the gcd is ``groups`` itself."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return group_norm(channels, GN_GROUPS)
    raise ValueError(f"backbone norm must be 'frozen_bn', 'bn' or 'gn', got {kind!r}")


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by a norm layer that has its own shift.
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv(in_ch, width, 3, stride)
        self.bn1 = make_norm(norm, width)
        self.conv2 = _conv(width, out_ch, 3)
        self.bn2 = make_norm(norm, out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + identity, inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision and detectron2 with STRIDE_IN_1X1 False),
    1x1 expand by 4 (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv(in_ch, width, 1)
        self.bn1 = make_norm(norm, width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = make_norm(norm, width)
        self.conv3 = _conv(width, out_ch, 1)
        self.bn3 = make_norm(norm, out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + identity, inplace=True)


def _shortcut(in_ch: int, out_ch: int, stride: int, norm: str) -> nn.Sequential | None:
    """Projection shortcut (``downsample.0`` conv, ``downsample.1`` norm) when the shape changes."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv(in_ch, out_ch, 1, stride), make_norm(norm, out_ch))


class ResNet(nn.Module):
    """ResNet trunk (no pooling head, no ``fc``) returning ``{"res2": ..., "res5": ...}``.

    ``out_channels`` and ``out_strides`` describe the four outputs; the stem's width is ``widths[0]``
    (64 for the standard widths, as torchvision).
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.depth not in STANDARD_BLOCKS:
            raise ValueError(f"backbone depth must be one of {sorted(STANDARD_BLOCKS)}, got {cfg.depth}")
        if cfg.stem not in ("imagenet", "small"):
            raise ValueError(f"backbone stem must be 'imagenet' or 'small', got {cfg.stem!r}")
        blocks = tuple(cfg.blocks) if cfg.blocks is not None else STANDARD_BLOCKS[cfg.depth]
        if len(blocks) != 4 or len(cfg.widths) != 4 or min(blocks) < 1 or min(cfg.widths) < 1:
            raise ValueError(f"backbone needs 4 positive widths and block counts, got {cfg.widths}, {blocks}")
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if cfg.depth < 50 else Bottleneck

        stem_ch = cfg.widths[0]
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_ch, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
            stem_stride = 4
        else:
            # Tiny images: one stride-2 conv, so res5 of a 64 px image is 4x4 rather than 2x2.
            self.conv1 = nn.Conv2d(3, stem_ch, 3, stride=2, padding=1, bias=False)
            self.maxpool = nn.Identity()
            stem_stride = 2
        self.bn1 = make_norm(cfg.norm, stem_ch)

        in_ch = stem_ch
        self.out_channels: dict[str, int] = {}
        self.out_strides: dict[str, int] = {}
        for i, (width, count) in enumerate(zip(cfg.widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(count):
                layers.append(block(in_ch, width, stride if j == 0 else 1, cfg.norm))
                in_ch = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.out_channels[f"res{i + 2}"] = in_ch
            self.out_strides[f"res{i + 2}"] = stem_stride * 2**i
        self._init_weights()

    def _init_weights(self) -> None:
        # He init (fan_out) for convs, as torchvision and detectron2 (c2_msra_fill) do; norms start at 1/0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        out: dict[str, torch.Tensor] = {}
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            out[f"res{i + 2}"] = x
        return out


_SHOW_KEYS = 10  # how many offending keys an error message lists


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f", ... ({len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else "")


def load_torchvision_weights(backbone: ResNet, path: str | Path) -> None:
    """Load a torchvision ImageNet ResNet state dict (``.pth``) into ``backbone``.

    ``fc.*`` (the classifier) is dropped. ``num_batches_tracked`` counters are dropped where the backbone has
    none (frozen BN) and kept at the backbone's own value where the file has none (checkpoints saved before
    torch 0.4.1). Anything else that does not match, by name or by shape, raises a ``ValueError`` that names
    the file and the offending keys, so a wrong depth/stem/width setting fails before training starts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    for key in list(state):
        if key.endswith(".num_batches_tracked") and key not in own:
            del state[key]
    for key, value in own.items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = value

    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own.keys() & state.keys()
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
        raise ValueError(
            f"{path}: does not fit the backbone (check model.backbone depth/widths/blocks/stem/norm): "
            + "; ".join(problems)
        )
    backbone.load_state_dict(state, strict=True)


class PixelNormalisation(nn.Module):
    """Raw RGB (0..255) -> (x - mean) / std with the model config's statistics. The buffers are not persistent:
    they come from the config, so checkpoints stay free of them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std
