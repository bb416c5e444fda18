"""Prediction: a trained model's semantic segmentation of a folder of images.

The test pipeline of MaskFormer/SimFormer: resize the shortest edge to ``augment.test_size``, pad to a
multiple of 32, upsample the mask logits to the padded size, combine them with the class probabilities
(``semantic_inference``), crop the padding, resize to the original resolution, take the argmax. Results go
to a COCO stuff-segmentation result file (RLE), the format detectron2 writes and the evaluator reads.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from weakshot.config import RunConfig
from weakshot.data.classes import ClassTable
from weakshot.data.dataset import TestDataset, evaluation_loader
from weakshot.engine.checkpoint import load_weights
from weakshot.engine.train import Model, autocast, new_model, pick_device
from weakshot.evaluation.results import ResultWriter
from weakshot.io_utils import atomic_path, read_yaml
from weakshot.model.maskformer import MaskFormer, segment


def load_model(model_dir: Path, device: torch.device, expected: type | None = None) -> tuple[Model, RunConfig]:
    """A trained model (a MaskFormer, or a baseline's network) and its resolved config, from a
    model folder (model.pt + config.yaml). With ``expected`` (a model class) another kind of model is an
    error that names the folder."""
    model_dir = Path(model_dir)
    saved = dict(read_yaml(model_dir / "config.yaml"))
    num_classes = int(saved.pop("num_classes"))
    run = RunConfig.from_dict(saved, where=str(model_dir / "config.yaml"))
    # ImageNet weights are part of model.pt already: do not ask for the original file.
    model = new_model(run, num_classes)
    if expected is not None and not isinstance(model, expected):
        raise ValueError(
            f"{model_dir}: not a {expected.description} (its method.supervision is {run.method.supervision!r})"
        )
    load_weights(model_dir / "model.pt", model)
    return model.to(device).eval(), run


@torch.no_grad()
def evaluation_outputs(
    model: Model,
    run: RunConfig,
    dataset: TestDataset,
    device: torch.device,
    keys: tuple[str, ...],
    num_workers: int = 0,
) -> Iterator[tuple[dict, tuple[int, int], dict[str, torch.Tensor]]]:
    """The network's ``keys`` outputs (float32) on each evaluation batch of ``dataset`` (resized, padded; see
    ``TestDataset``): yields (batch, padded size, outputs). Prediction, CAMs and RETAB's features all read
    the training images or the test images this way."""
    loader = evaluation_loader(dataset, num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        with autocast(run, device):
            outputs = model(images)
        yield batch, tuple(images.shape[-2:]), {k: outputs[k].float() for k in keys}


def predict_label_maps(
    model: MaskFormer, run: RunConfig, dataset: TestDataset, device: torch.device, num_workers: int = 0
) -> Iterator[tuple[str, np.ndarray, torch.Tensor]]:
    """Yield (name, label map uint8 at the original resolution, K x H x W scores) per image."""
    keys = ("pred_logits", "pred_masks")
    for batch, padded, outputs in evaluation_outputs(model, run, dataset, device, keys, num_workers):
        scores = segment(outputs, padded, batch["image_size"], batch["orig_size"])  # one image at a time
        for name, score in zip(batch["names"], scores, strict=True):
            yield name, score.argmax(0).to(torch.uint8).cpu().numpy(), score


def class_palette(num_classes: int, seed: int = 0) -> list[int]:
    """A fixed colour per class id (flat RGB list for a "P"-mode PNG); 255 (ignore) is black."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(256, 3), dtype=np.uint8)
    colours[255] = 0
    return colours[: max(num_classes, 256)].reshape(-1).tolist()


def write_colour_mask(path: Path, label_map: np.ndarray, palette: list[int]) -> None:
    from PIL import Image

    image = Image.fromarray(label_map, mode="L").convert("P")
    image.putpalette(palette)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def predict_folder(
    model_dir: Path,
    images: Path,
    out: Path,
    *,
    device: str | None = None,
    classes: Path | None = None,
    masks_dir: Path | None = None,
) -> int:
    """Segment every image under ``images`` (a prepared ``images/<split>`` folder or any folder of images)
    and write the COCO-format result file ``out`` (and, with ``masks_dir``, one colour PNG per image whose
    palette index is the class id). Returns the number of images."""
    dev = pick_device(device)
    model, run = load_model(model_dir, dev, expected=MaskFormer)
    dataset = TestDataset(images, None, run.augment.test_size)
    id_map = ClassTable.load(classes).id_to_dataset_id() if classes else {c: c for c in range(model.num_classes)}
    t0 = time.perf_counter()
    count = 0
    palette = class_palette(model.num_classes)
    with ResultWriter(out, id_map) as writer:
        for name, label_map, _ in predict_label_maps(model, run, dataset, dev):
            writer.add(name, label_map)
            if masks_dir is not None:
                write_colour_mask(Path(masks_dir) / f"{name}.png", label_map, palette)
            count += 1
    print(f"[predict] {count} images in {time.perf_counter() - t0:.1f} s -> {out}", file=sys.stderr)
    return count
