"""CAM pseudo-labels: the WSSS baseline (the paper's column (d)), and the initial response of RETAB.

The CAM classifier (``method.supervision: image``, ``model/cam_classifier.py``) is trained once per dataset on
the image-level labels of every class. Its class maps on a training image are normalised as in PSA/RETAB
(ReLU, divided by the per-class maximum) and restricted to the *novel* classes the image-level labels name;
each pixel outside the GT base masks takes the novel class of highest normalised CAM.

Decision for the weak-shot setting (every training image has its base masks): PSA's background channel
(1 - max CAM)^alpha is not used. Outside the base masks there is no background class to find; those pixels
are novel classes or (a few percent) unlabelled clutter, so every one of them is given its best present novel
class, and `min_score` (default 0) can leave weakly activated pixels unlabelled instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from weakshot.config import RunConfig
from weakshot.data.dataset import TestDataset
from weakshot.data.splits import load_split, read_split_image_labels
from weakshot.engine.predict import evaluation_outputs, load_model
from weakshot.engine.train import pick_device
from weakshot.methods.pseudo_labels import write_label_folder
from weakshot.model.cam_classifier import CamClassifier, normalised_cams
from weakshot.model.maskformer import postprocess

UNLABELLED = 255


def class_activation_maps(
    model: CamClassifier, run: RunConfig, dataset: TestDataset, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, raw CAMs K x H x W at the original resolution) per image of ``dataset``."""
    for batch, padded, outputs in evaluation_outputs(model, run, dataset, device, ("cams",)):
        for name, cam, size, orig in zip(batch["names"], outputs["cams"], batch["image_size"], batch["orig_size"]):
            yield name, postprocess(cam, padded, size, orig)


def cam_label_map(cams: torch.Tensor, novel_present: list[int], min_score: float = 0.0) -> np.ndarray:
    """Class map of the best present novel class per pixel (255 where none is present or the normalised CAM is
    below ``min_score``). Base pixels are filled in from the GT afterwards (``pseudo_label``)."""
    height, width = cams.shape[-2:]
    if not novel_present:
        return np.full((height, width), UNLABELLED, dtype=np.uint8)
    score, index = normalised_cams(cams, novel_present).max(0)
    labels = torch.tensor(novel_present, dtype=torch.int64)[index]
    labels[score < min_score] = UNLABELLED
    return labels.to(torch.uint8).numpy()


def write_cam_pseudo_labels(
    model_dir: Path,
    prepared: Path,
    split: Path,
    image_labels: Path,
    out_dir: Path,
    report: Path,
    *,
    min_score: float = 0.0,
    device: str | None = None,
) -> dict:
    dev = pick_device(device)
    model, run = load_model(model_dir, dev, expected=CamClassifier)
    labels = read_split_image_labels(image_labels)
    dataset = TestDataset(prepared, "train", test_size=run.augment.test_size)
    labelled = (
        (name, cam_label_map(cams.cpu(), labels.get(name, ([], []))[1], min_score))
        for name, cams in class_activation_maps(model, run, dataset, dev)
    )
    return write_label_folder(
        labelled, prepared, load_split(split), labels, model.num_classes, out_dir, report,
        source=f"CAM of {model_dir}",
    )  # fmt: skip
