"""Paper-scale training throughput on a GPU: images/s, peak memory and the projected wall time of a split.

Runs the training step of `engine/train.py` (autocast, channels-last, pinned memory, data-loading workers,
Hungarian matching, every loss, AdamW, gradient clipping) with the resolved settings of a paper config
(ResNet-50, 100 queries, 6 decoder layers, 640x640 crops, batch 8) for the base model and for the
Cross-Pair SimFormer. The GPU machines have no dataset, so it draws a small embedded dataset at the crop
size first (real COCO-Stuff-10K images cost the same per step once cropped; the class count, 44 instead of
171, only changes the class head). Backbone weights are random: throughput does not depend on them.

    python bench/paper_scale_step.py [--config config/coco_stuff_10k.yaml] [--methods base_model cross_pair]
        [--steps 30] [--warmup 5] [--amp bf16] [--workdir /tmp/paper-scale-bench]

On a CPU it runs too (slowly; e.g. `--image-size 128 --steps 2 --warmup 1` as a smoke test).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from weakshot.config import RunConfig, deep_merge
from weakshot.data.archives import safe_extract
from weakshot.data.classes import ClassTable
from weakshot.data.cocostuff import convert_cocostuff
from weakshot.data.dataset import infinite_loader
from weakshot.data.embedded import EmbeddedConfig, generate_embedded
from weakshot.data.splits import SplitSpec, write_image_labels, write_split, write_split_image_labels
from weakshot.engine.train import (
    TrainInputs,
    build_dataset,
    build_loss_modules,
    build_model,
    build_optimizer,
    forward,
    loss_parts,
    loss_weights,
    pick_device,
    step_losses,
    to_device,
)
from weakshot.losses.criterion import total_loss

ROOT = Path(__file__).resolve().parents[1]


def resolved_settings(config_file: Path, method: str) -> dict:
    """A model's settings as rules/common.smk resolves them: config/config.yaml, then the paper config."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config = deep_merge(config, yaml.safe_load(config_file.read_text()))
    dataset = config["datasets"][config["dataset"]]
    settings = {}
    for layer in (config["training"], dataset.get("training", {}), config["methods"][method],
                  dataset.get("methods", {}).get(method, {})):  # fmt: skip
        settings = deep_merge(settings, layer)
    return settings


def synthetic_dataset(workdir: Path, image_size: int, num_train: int) -> dict[str, Path]:
    """An embedded dataset drawn at the crop size, prepared and split (Split 1) as the DAG would."""
    prepared = workdir / "prepared"
    if not (prepared / "classes.yaml").exists():
        spec = {"seed": 0, "image_size": image_size, "num_train": num_train, "num_test": 1}
        archive, classes = workdir / "archive.zip", workdir / "classes.yaml"
        generate_embedded(EmbeddedConfig.from_dict(spec), archive=archive, classes=classes)
        safe_extract(archive, workdir / "raw")
        convert_cocostuff(workdir / "raw", prepared, ClassTable.load(classes))
        split_spec = {"source": "random", "num_random": 1, "novel_fraction": 0.25, "extra_novel_ratios": [], "seed": 0}
        write_split(prepared / "classes.yaml", SplitSpec.from_dict(split_spec), "split1", workdir / "split1.yaml")
        write_image_labels(prepared, workdir / "image_labels.tsv")
        write_split_image_labels(workdir / "image_labels.tsv", workdir / "split1.yaml", workdir / "split1_labels.tsv")
    return {"prepared": prepared, "split": workdir / "split1.yaml", "image_labels": workdir / "split1_labels.tsv"}


def measure(run: RunConfig, data: dict[str, Path], device: torch.device, steps: int, warmup: int) -> dict:
    num_classes = ClassTable.load(data["prepared"] / "classes.yaml").num_classes
    model = build_model(run, num_classes, None).to(device)
    losses_module = build_loss_modules(run, num_classes).to(device)
    if device.type == "cuda" and run.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = loss_weights(run, losses_module)
    optimizer, parameters = build_optimizer(run, model, losses_module)
    inputs = TrainInputs(data["prepared"], Path("/dev/null"), split=data["split"], image_labels=data["image_labels"])
    batches = iter(
        infinite_loader(
            build_dataset(run, inputs), run.train.batch_size, num_workers=run.train.num_workers,
            seed=run.train.seed, pin_memory=device.type == "cuda",
        )
    )  # fmt: skip
    criterion, similarity = loss_parts(losses_module)  # a segmenter's: the set criterion and its matcher
    matching = [0.0]
    match_layers = criterion.matcher.match_layers

    def timed_match(*args, **kwargs):  # the one host transfer of a step and the scipy assignment
        start = time.perf_counter()
        result = match_layers(*args, **kwargs)
        matching[0] += time.perf_counter() - start
        return result

    criterion.matcher.match_layers = timed_match

    def step() -> int:
        # engine/train.py's step: forward, every loss, backward, clipping, AdamW.
        batch = to_device(next(batches), device)
        outputs = forward(model, batch, run, device)
        loss = total_loss(step_losses(criterion, similarity, outputs, batch), weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, run.train.clip_grad_norm)
        optimizer.step()
        return batch["images"].shape[0]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    matching[0] = 0.0
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        images += step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_s": images / elapsed, "step_s": elapsed / steps, "peak_gib": peak,
            "matching_share": matching[0] / elapsed, "images_per_step": images / steps}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "coco_stuff_10k.yaml")
    parser.add_argument("--methods", nargs="+", default=["base_model", "cross_pair"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="default: the config's")
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's crop size")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/paper-scale-bench"))
    args = parser.parse_args()

    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    reports = {}
    for method in args.methods:
        settings = resolved_settings(args.config, method)
        settings["model"]["backbone"]["weights"] = None
        settings["method"]["init"] = "imagenet"
        size = args.image_size or settings["augment"]["crop_size"]
        settings["augment"].update(crop_size=size, test_size=size)
        if args.amp:
            settings["train"]["amp"] = args.amp
        run = RunConfig.from_dict(settings)
        data = synthetic_dataset(args.workdir / f"size{size}", size, args.num_train)
        reports[method] = (run, measure(run, data, device, args.steps, args.warmup))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.config.name} on {name}, torch {torch.__version__}, {args.steps} timed steps after {args.warmup}")
    for method, (run, r) in reports.items():
        hours = r["step_s"] * run.train.iterations / 3600
        print(f"  {method:12s} batch {run.train.batch_size} ({r['images_per_step']:.0f} images/step) "
              f"{run.augment.crop_size}px amp {run.train.amp}: {r['images_per_s']:.1f} images/s, "
              f"{r['step_s'] * 1000:.0f} ms/step, peak {r['peak_gib']:.1f} GiB, matching {r['matching_share']:.1%} "
              f"of the step; {run.train.iterations} iterations = {hours:.1f} h")  # fmt: skip


if __name__ == "__main__":
    main()
