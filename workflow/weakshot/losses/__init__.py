"""Losses of the MaskFormer part of SimFormer: Hungarian matching, class / mask / complementary losses."""

from weakshot.losses.criterion import (
    CountShare,
    SetCriterion,
    build_criterion,
    complementary_target,
    dice_loss,
    sigmoid_focal_loss,
    total_loss,
)
from weakshot.losses.matcher import HungarianMatcher, Indices, nearest_downsample

__all__ = [
    "CountShare",
    "HungarianMatcher",
    "Indices",
    "SetCriterion",
    "build_criterion",
    "complementary_target",
    "dice_loss",
    "nearest_downsample",
    "sigmoid_focal_loss",
    "total_loss",
]
