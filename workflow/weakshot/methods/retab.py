"""RETAB pseudo-labels: novel CAMs propagated by a boundary-aware random walk over transferred affinities.

Per training image (RETAB's inference, ``infer_aff_cam_boundary*.py``, adapted):

1. the CAM classifier's maps of the novel classes the image-level labels name, normalised (PSA);
2. adaptation: the maps are set to 0 on the ground-truth base pixels, which the weak-shot setting has and which
   hold no novel class, then average-pooled to the RETAB network's grid;
3. the two-stage boundary-aware random walk (``random_walk.py``) with the affinity features and the predicted
   boundary (probability > 0.5) of the split's RETAB network, trained on base masks;
4. the walked maps are upsampled to the image and every non-base pixel takes the present novel class of highest
   score; base pixels come from the ground truth (``pseudo_label``).

RETAB adds a background channel ``(1 - max CAM)^alpha`` and searches its threshold on labelled data; with base
masks in every image there is no background to find outside them (see ``cam.py``), so there is none here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakshot.config import RunConfig
from weakshot.data.dataset import TestDataset, read_label
from weakshot.data.splits import load_split, read_split_image_labels
from weakshot.engine.predict import evaluation_outputs, load_model
from weakshot.engine.train import pick_device
from weakshot.methods.cam import UNLABELLED, class_activation_maps
from weakshot.methods.pseudo_labels import write_label_folder
from weakshot.methods.random_walk import random_walk
from weakshot.model.cam_classifier import CamClassifier, normalised_cams
from weakshot.model.retab_net import RetabNet


def retab_features(
    model: RetabNet, run: RunConfig, dataset: TestDataset, device: torch.device
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (name, affinity features C x h x w, boundary probability h x w) on the image's own grid (the
    padding cropped off)."""
    keys = ("affinity_features", "boundary_logits")
    for batch, _, outputs in evaluation_outputs(model, run, dataset, device, keys):
        for i, (name, size) in enumerate(zip(batch["names"], batch["image_size"])):
            h, w = (math.ceil(s / model.stride) for s in size)
            yield (
                name,
                outputs["affinity_features"][i, :, :h, :w].cpu(),
                outputs["boundary_logits"][i, :h, :w].sigmoid().cpu(),
            )


def retab_label_map(
    cams: torch.Tensor,
    features: torch.Tensor,
    boundary_prob: torch.Tensor,
    base_pixels: torch.Tensor,
    novel_present: list[int],
    *,
    radius: int = 5,
    beta: float = 8.0,
    log_t: int = 8,
) -> np.ndarray:
    """Class map (H x W uint8) of the best present novel class after the walk; 255 where none is present.
    ``cams`` K x H x W raw CAMs at the image's resolution; ``base_pixels`` H x W bool (GT base)."""
    height, width = cams.shape[-2:]
    if not novel_present:
        return np.full((height, width), UNLABELLED, dtype=np.uint8)
    maps = normalised_cams(cams, novel_present) * (~base_pixels).to(cams.dtype)
    grid = tuple(features.shape[-2:])
    pooled = F.adaptive_avg_pool2d(maps[None], grid)[0]
    walked = random_walk(pooled, features, boundary_prob > 0.5, radius=radius, beta=beta, log_t=log_t)
    scores = F.interpolate(walked[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    labels = torch.tensor(novel_present, dtype=torch.int64)[scores.argmax(0)]
    return labels.to(torch.uint8).numpy()


def write_retab_pseudo_labels(
    cam_model_dir: Path,
    retab_model_dir: Path,
    prepared: Path,
    split: Path,
    image_labels: Path,
    out_dir: Path,
    report: Path,
    *,
    beta: float = 8.0,
    log_t: int = 8,
    device: str | None = None,
) -> dict:
    dev = pick_device(device)
    cam_model, cam_run = load_model(cam_model_dir, dev, expected=CamClassifier)
    retab_model, retab_run = load_model(retab_model_dir, dev, expected=RetabNet)
    record = load_split(split)
    labels = read_split_image_labels(image_labels)
    base_ids = torch.tensor(record["base_ids"])
    cam_data = TestDataset(prepared, "train", test_size=cam_run.augment.test_size)
    retab_data = TestDataset(prepared, "train", test_size=retab_run.augment.test_size)

    def labelled() -> Iterator[tuple[str, np.ndarray]]:
        per_image_cams = class_activation_maps(cam_model, cam_run, cam_data, dev)
        pairs = zip(per_image_cams, retab_features(retab_model, retab_run, retab_data, dev))
        for (name, cams), (same_name, features, boundary) in pairs:
            assert name == same_name, (name, same_name)  # both datasets list the folder in name order
            gt = torch.from_numpy(read_label(Path(prepared) / "labels" / "train" / f"{name}.png").astype(np.int64))
            yield name, retab_label_map(
                cams.cpu(), features, boundary, torch.isin(gt, base_ids), labels.get(name, ([], []))[1],
                radius=retab_run.loss.affinity_radius, beta=beta, log_t=log_t,
            )  # fmt: skip

    return write_label_folder(
        labelled(), prepared, record, labels, cam_model.num_classes, out_dir, report,
        source=f"RETAB: CAM of {cam_model_dir}, affinity and boundary of {retab_model_dir}",
    )  # fmt: skip
