"""The training loop shared by every method (FullyOracle, base model, SimFormer variants, retraining).

What differs between methods is data, not code: ``method.supervision`` picks the targets the mapper builds
(full / base / weak), ``loss.complementary_weight`` switches the complementary loss, and
``similarity.pairing`` switches pixel-pixel similarity transfer (none / self / cross pairs). The CAM classifier
of the baselines (``method.supervision: image``) is the one other model the loop trains: same data stream,
image-level BCE instead of the set criterion.

The loop: AdamW (backbone lr multiplier, no decay on norms and embeddings), poly learning rate, full-model
gradient clipping, autocast (bf16/fp16) and channels-last on CUDA, seeded and deterministic on CPU. It
writes ``checkpoint.pt`` every ``train.checkpoint_every`` iterations (atomically); run again after a kill,
it resumes from there and ends with the same weights as an uninterrupted run (a checkpoint that another run
config wrote, say before the config's ``iterations`` changed, is not resumed: the run starts again). When done
it writes
``model.pt`` (state dict), ``config.yaml`` (the resolved config) and ``train_log.jsonl`` and removes the
checkpoint.

Started by torchrun with N processes (weakshot.engine.distributed), the same loop is data-parallel: each rank
takes its share of every global batch, DistributedDataParallel averages the gradients (of the segmenter and
of SimNet), the losses divide by counts of the global batch, and rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weakshot.config import RunConfig
from weakshot.data.classes import ClassTable
from weakshot.data.dataset import PairDataset, SegmentationDataset, WeakShotDataset, WeakShotMapper, infinite_loader
from weakshot.engine.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    save_weights,
)
from weakshot.engine.distributed import World, close_world, init_world
from weakshot.io_utils import atomic_path, write_yaml
from weakshot.losses.criterion import build_criterion, total_loss
from weakshot.losses.image_labels import ImageLabelLoss
from weakshot.losses.retab import RetabLoss
from weakshot.model.backbone import load_torchvision_weights
from weakshot.model.cam_classifier import CamClassifier
from weakshot.model.maskformer import MaskFormer, param_groups
from weakshot.model.retab_net import RetabNet

Model = MaskFormer | CamClassifier | RetabNet


@dataclass(frozen=True)
class TrainInputs:
    prepared: Path  # prepared dataset folder
    out_dir: Path  # model folder to write
    split: Path | None = None  # split YAML (base/novel ids); None for the oracle
    image_labels: Path | None = None  # the split's image-level labels (reference-image selection)
    pseudo_labels: Path | None = None  # folder of pseudo-label PNGs replacing the training labels
    init_weights: Path | None = None  # model.pt to start from (method.init == "base_model")


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def new_model(run: RunConfig, num_classes: int) -> Model:
    """The segmenter, or a baseline's network: the CAM classifier (``image``), RETAB's nets (``retab``)."""
    if run.method.supervision == "image":
        return CamClassifier(run.model, num_classes)
    if run.method.supervision == "retab":
        return RetabNet(run.model, num_classes)
    return MaskFormer(run.model, num_classes)


def build_model(run: RunConfig, num_classes: int, init_weights: Path | None) -> Model:
    """A freshly initialised model for training: from the base model, or with ImageNet backbone weights."""
    model = new_model(run, num_classes)
    if run.method.init == "base_model":
        if init_weights is None:
            raise ValueError("method.init is 'base_model' but no base model weights were given (--init)")
        load_weights(init_weights, model)
    elif run.model.backbone.weights:
        load_torchvision_weights(model.backbone, Path(run.model.backbone.weights))
    return model


def build_loss_modules(run: RunConfig, num_classes: int, world: World | None = None) -> nn.ModuleDict:
    """The criterion and, with pixel-pixel transfer, the similarity loss (which owns SimNet's weights); the CAM
    classifier has its image-level loss only. Their normalising counts are those of the global batch (of
    this process's when ``world`` is None)."""
    world = world or World()
    if run.method.supervision == "image":
        # A mean over images x classes: every rank has as many, so the mean of ranks is the global mean.
        return nn.ModuleDict({"image": ImageLabelLoss(num_classes, run.loss.image_pos_weight)})
    if run.method.supervision == "retab":
        retab = RetabLoss(run.loss.affinity_radius)
        retab.count_share = world.count_share
        return nn.ModuleDict({"retab": retab})
    modules = nn.ModuleDict({"set": build_criterion(num_classes, run.model, run.loss, world.count_share)})
    if run.similarity.pairing != "none":
        from weakshot.losses.pixel_similarity import PixelSimilarityLoss

        modules["similarity"] = PixelSimilarityLoss(run.similarity, run.model.mask_dim)
        modules["similarity"].sum_over_ranks = world.sum
    return modules


def loss_parts(losses: nn.ModuleDict) -> tuple[nn.Module, nn.Module | None]:
    """The main loss of ``build_loss_modules``' dict (the segmenter's set criterion, or the one loss of a
    baseline network: CAM classifier, RETAB nets) and the pixel-similarity loss, None without one."""
    main = losses["set" if "set" in losses else next(iter(losses))]
    return main, losses["similarity"] if "similarity" in losses else None


def loss_weights(run: RunConfig, losses: nn.ModuleDict) -> dict[str, float]:
    main, similarity = loss_parts(losses)  # a baseline network has only its one loss
    weights = dict(main.weight_dict)
    if similarity is not None:
        weights["loss_sim"] = run.similarity.sim_weight
        weights["loss_distill"] = run.similarity.distill_weight
    return weights


def build_dataset(run: RunConfig, inputs: TrainInputs) -> WeakShotDataset | PairDataset:
    novel_ids = None
    if inputs.split is not None:
        from weakshot.data.splits import load_split

        novel_ids = load_split(inputs.split)["novel_ids"]
    if run.method.supervision in ("weak", "base", "retab") and not novel_ids:
        raise ValueError(f"method.supervision {run.method.supervision!r} needs a split (--split)")
    if run.method.pseudo_labels and inputs.pseudo_labels is None:
        raise ValueError(
            f"method.pseudo_labels is {run.method.pseudo_labels!r}: "
            "give that method's pseudo-label folder (--pseudo-labels)"
        )
    if run.method.supervision in ("image", "retab") and run.similarity.pairing != "none":
        raise ValueError(
            f"method.supervision {run.method.supervision!r} trains a baseline network: set similarity.pairing 'none'"
        )
    if inputs.pseudo_labels is not None and run.method.supervision != "full":
        raise ValueError("training on pseudo-labels needs method.supervision 'full' (every class has masks there)")
    source = SegmentationDataset(inputs.prepared, "train", labels_dir=inputs.pseudo_labels)
    # The CAM classifier reads the classes present in each augmented crop: the "full" targets' labels.
    mode = {"image": "full", "retab": "weak"}.get(run.method.supervision, run.method.supervision)
    mapper = WeakShotMapper(run.augment, novel_ids, mode, seed=run.train.seed)
    dataset = WeakShotDataset(source, mapper)
    if run.similarity.pairing == "none":
        return dataset
    sampler = None
    if run.similarity.pairing == "cross":
        if inputs.image_labels is None:
            raise ValueError("cross-image pairs need the split's image-level labels (--image-labels)")
        from weakshot.data.pairs import ReferenceSampler, build_pair_index
        from weakshot.data.splits import read_split_image_labels

        labels = read_split_image_labels(inputs.image_labels)
        missing = [name for name in source.names if name not in labels]
        if missing:
            raise ValueError(f"{inputs.image_labels}: no image-level labels for {missing[:3]} ...")
        sampler = ReferenceSampler(build_pair_index({n: labels[n] for n in source.names}, run.train.seed))
    return PairDataset(dataset, sampler, pairing=run.similarity.pairing)


def data_parallel(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``module`` wrapped for gradient averaging over ranks (itself in a world of one, or without weights)."""
    if not world.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return move(batch)


def autocast(run: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or run.train.amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if run.train.amp == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def lr_factor(iteration: int, iterations: int, power: float, warmup: int = 0) -> float:
    """Poly decay over the whole run, times a linear warm-up over the first ``warmup`` iterations."""
    decay = (1.0 - iteration / iterations) ** power
    return decay * min(1.0, (iteration + 1) / warmup) if warmup > 0 else decay


def set_determinism(run: RunConfig, device: torch.device) -> None:
    torch.manual_seed(run.train.seed)
    if device.type == "cpu" and run.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


class Progress:
    """A one-line progress report every ``every`` iterations (to stderr, which the rule's log keeps)."""

    def __init__(self, total: int, start: int, every: int) -> None:
        self.total, self.start, self.every = total, start, every
        self.t0 = time.perf_counter()

    def __call__(self, iteration: int, record: dict[str, Any]) -> None:
        done = iteration + 1 - self.start
        elapsed = time.perf_counter() - self.t0
        rate = done / max(elapsed, 1e-9)
        eta = (self.total - iteration - 1) / max(rate, 1e-9)
        losses = " ".join(f"{k[5:]}={v:.3f}" for k, v in record.items() if k.startswith("loss_") and "_" not in k[5:])
        print(
            f"[train] {iteration + 1}/{self.total} {rate:.2f} it/s eta {eta / 60:.1f} min total={record['loss']:.3f} "
            f"{losses}",
            file=sys.stderr,
            flush=True,
        )


def build_optimizer(
    run: RunConfig, model: nn.Module, losses_module: nn.ModuleDict
) -> tuple[torch.optim.AdamW, list[nn.Parameter]]:
    """AdamW over the network (backbone at ``backbone_multiplier`` x lr) and the losses' own weights (SimNet);
    no decay on norms and embeddings. Each group keeps its ``initial_lr`` for the poly schedule. Returns the
    optimiser and the parameters to clip."""
    groups = param_groups(model, run.train.lr, run.train.weight_decay, run.train.backbone_multiplier)
    groups += param_groups(losses_module, run.train.lr, run.train.weight_decay, 1.0)
    for group in groups:
        group["initial_lr"] = group["lr"]
    parameters = [p for group in groups for p in group["params"]]
    # The fused kernel (CPU and CUDA) updates every tensor in one pass: 5x faster than the per-tensor loop on
    # a small model, where the optimiser step was a sixth of the training step.
    fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
    optimizer = torch.optim.AdamW(groups, lr=run.train.lr, weight_decay=run.train.weight_decay, fused=fused)
    return optimizer, parameters


def forward(segmenter: nn.Module, batch: dict[str, Any], run: RunConfig, dev: torch.device) -> dict:
    """The network's outputs for a batch already on ``dev`` (autocast and channels-last on CUDA)."""
    images = batch["images"]
    if dev.type == "cuda" and run.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(run, dev):
        # The CAM classifier pools over the real pixels only: it reads the padding mask.
        is_cam = isinstance(getattr(segmenter, "module", segmenter), CamClassifier)
        return segmenter(images, batch["pad_mask"]) if is_cam else segmenter(images)


def step_losses(
    main_loss: nn.Module, similarity: nn.Module | None, outputs: dict, batch: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Every loss term of one step: the segmenter's set criterion, or the one loss of a baseline network (CAM
    classifier, RETAB nets), plus pixel-pixel similarity transfer (in float32) when the method has it."""
    losses = main_loss(outputs, batch)
    if similarity is not None:
        final = {k: outputs[k].float() for k in ("mask_features", "pred_logits", "pred_masks")}
        losses.update(similarity(final["mask_features"], final["pred_logits"], final["pred_masks"], batch))
    return losses


# Settings that change neither the weights nor the data order: a run may resume across a change of them.
_RESUME_INDIFFERENT = ("num_workers", "checkpoint_every", "log_every")


def run_fingerprint(run: RunConfig, num_classes: int) -> str:
    """What a checkpoint must have been written by for a run to resume from it: the resolved run config (less
    the settings in ``_RESUME_INDIFFERENT``) and the number of classes, as canonical JSON."""
    record = run.to_dict()
    record["train"] = {k: v for k, v in record["train"].items() if k not in _RESUME_INDIFFERENT}
    return json.dumps({"num_classes": num_classes, **record}, sort_keys=True)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def resumable_iteration(checkpoint: Path, fingerprint: str, report: bool) -> int | None:
    """The iteration to resume at from ``checkpoint``, or None when another run config wrote it (the config
    changed after a killed run): continuing would finish the old run under the new name, so the run starts
    from iteration 0 instead and overwrites the checkpoint at its first save. ``report`` prints why."""
    state = read_checkpoint(checkpoint, mmap=True)
    written_by = state["extra"].get("run")
    if written_by == fingerprint:
        return int(state["iteration"])
    if report:
        if written_by is None:
            why = "it does not record the run config that wrote it (an older version)"
        else:
            changes = _differences(json.loads(written_by), json.loads(fingerprint))
            why = "the run config has changed since: " + "; ".join(changes[:5])
            why += f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        print(f"[train] not resuming from {checkpoint}: {why}; starting from iteration 0", file=sys.stderr, flush=True)
    return None


def train(run: RunConfig, inputs: TrainInputs, *, device: str | None = None, stop_at: int | None = None) -> Path:
    """Train one model into ``inputs.out_dir``; returns the path of ``model.pt``.

    ``stop_at`` ends the run after that many iterations, leaving only the checkpoint: it stands in for a
    killed job in tests.
    """
    out_dir = Path(inputs.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    world = init_world(dev)
    if dev.type == "cuda" and world.distributed:
        dev = torch.device("cuda", world.local_rank)
    try:
        return _train(run, inputs, out_dir, dev, world, stop_at)
    finally:
        close_world(world)


def _train(
    run: RunConfig, inputs: TrainInputs, out_dir: Path, dev: torch.device, world: World, stop_at: int | None
) -> Path:
    set_determinism(run, dev)
    class_table = ClassTable.load(Path(inputs.prepared) / "classes.yaml")
    num_classes = class_table.num_classes

    model = build_model(run, num_classes, inputs.init_weights).to(dev)
    losses_module = build_loss_modules(run, num_classes, world).to(dev)
    if dev.type == "cuda" and run.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = loss_weights(run, losses_module)
    optimizer, parameters = build_optimizer(run, model, losses_module)

    dataset = build_dataset(run, inputs)
    checkpoint = out_dir / CHECKPOINT_NAME
    fingerprint = run_fingerprint(run, num_classes)
    log_lines = []
    # Read the iteration first: the data stream is positioned arithmetically, then RNG state restored.
    resume_at = resumable_iteration(checkpoint, fingerprint, world.is_main) if checkpoint.exists() else None
    resume = resume_at is not None
    start = resume_at or 0
    batches: Iterator[dict] = iter(
        infinite_loader(
            dataset,
            run.train.batch_size,
            num_workers=run.train.num_workers,
            seed=run.train.seed,
            pin_memory=dev.type == "cuda",
            start_iteration=start,
            rank=world.rank,
            world_size=world.size,
        )
    )
    if resume:
        start, extra = load_checkpoint(checkpoint, model=model, criterion=losses_module, optimizer=optimizer)
        log_lines = list(extra.get("log", []))
        if world.is_main:
            print(f"[train] resumed from {checkpoint} at iteration {start}", file=sys.stderr, flush=True)
    # Wrapped after loading: DDP starts every rank from rank 0's weights (the same, seeded or resumed).
    world.local_batch(run.train.batch_size)  # a clear error when the batch does not split over the ranks
    segmenter = data_parallel(model, world, dev)
    main_loss, similarity = loss_parts(losses_module)
    if similarity is not None:
        similarity = data_parallel(similarity, world, dev)

    def save(iteration: int) -> None:
        if world.is_main:
            save_checkpoint(
                checkpoint, iteration=iteration, model=model, criterion=losses_module, optimizer=optimizer,
                extra={"log": log_lines, "run": fingerprint},
            )  # fmt: skip

    model.train()
    losses_module.train()
    progress = Progress(run.train.iterations, start, run.train.log_every)
    end = run.train.iterations if stop_at is None else min(stop_at, run.train.iterations)
    for iteration in range(start, end):
        factor = lr_factor(iteration, run.train.iterations, run.train.poly_power, run.train.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        batch = to_device(next(batches), dev)
        outputs = forward(segmenter, batch, run, dev)
        losses = step_losses(main_loss, similarity, outputs, batch)
        loss = total_loss(losses, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.train.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, run.train.clip_grad_norm)
        optimizer.step()

        if (iteration + 1) % run.train.log_every == 0 or iteration + 1 == run.train.iterations:
            # The only host synchronisation of the loop: reading the losses (averaged over ranks) for the log.
            names = list(losses)
            values = world.mean(torch.stack([loss.detach().float()] + [losses[k].detach().float() for k in names]))
            values = values.tolist()
            record = {"iteration": iteration + 1, "lr": optimizer.param_groups[0]["lr"], "loss": values[0]}
            record.update(zip(names, values[1:]))
            if not all(math.isfinite(v) for v in record.values()):
                raise FloatingPointError(f"non-finite loss at iteration {iteration + 1}: {record}")
            if world.is_main:
                log_lines.append(json.dumps(record))
                progress(iteration, record)
        if (iteration + 1) % run.train.checkpoint_every == 0 and iteration + 1 < run.train.iterations:
            save(iteration + 1)
    if end < run.train.iterations:
        save(end)
        world.barrier()
        return checkpoint

    model_path = out_dir / "model.pt"
    if world.is_main:
        write_yaml(out_dir / "config.yaml", {"num_classes": num_classes, **run.to_dict()})
        with atomic_path(out_dir / "train_log.jsonl") as tmp:
            tmp.write_text("".join(line + "\n" for line in log_lines))
        if "similarity" in losses_module:
            save_weights(out_dir / "simnet.pt", losses_module["similarity"])
        save_weights(model_path, model)
        checkpoint.unlink(missing_ok=True)
    world.barrier()
    return model_path
