"""Throughput of one training step of the embedded-default model, data loading and matching included.

Prints images per second and the achieved FLOP/s as a fraction of this machine's large-matmul FLOP/s
(torch's FlopCounterMode counts the model's forward+backward FLOPs; a timed 2048^3 matmul gives the peak),
plus where the step's time goes (data, forward, matching + losses, backward + optimiser).

    python bench/train_step.py [--config config/config.yaml] [--method cross_pair] [--threads 2] [--steps 20]
        [--profile 15] [--cpu-bf16] [--compile]

``--profile N`` also prints the N operators that take the most time in the timed steps (torch.profiler, self
CPU time), which says where the step falls short of the matmul peak. ``--cpu-bf16`` runs the forward pass under
CPU bf16 autocast and ``--compile`` wraps the segmenter in ``torch.compile`` (its compilation falls in the
warm-up steps, which are not timed; the time is printed): two speed-ups that training does not use on CPU, kept
here so that the measurement behind that choice can be rerun.

Needs the prepared embedded dataset (`snakemake --cores 2 results/embedded/splits/split1_image_labels.tsv`).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from weakshot.config import RunConfig, deep_merge
from weakshot.data.dataset import infinite_loader
from weakshot.engine.train import (
    TrainInputs,
    build_dataset,
    build_loss_modules,
    build_model,
    build_optimizer,
    forward,
    loss_parts,
    loss_weights,
    step_losses,
)
from weakshot.losses.criterion import total_loss


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--method", default="oracle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--split", default="split1")
    parser.add_argument("--cpu-bf16", action="store_true", help="forward pass under CPU bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the segmenter")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N most costly operators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = yaml.safe_load(args.config.read_text())
    run_dict = deep_merge(config["training"], config["methods"][args.method])
    run_dict.setdefault("method", {})["init"] = "imagenet"  # throughput only: random init is as fast
    run = RunConfig.from_dict(run_dict)
    results = Path("results") / config["dataset"]
    inputs = TrainInputs(
        prepared=results / "prepared",
        out_dir=Path("/dev/null"),
        split=None if args.method == "oracle" else results / "splits" / f"{args.split}.yaml",
        image_labels=results / "splits" / f"{args.split}_image_labels.tsv",
    )
    num_classes = len(yaml.safe_load((inputs.prepared / "classes.yaml").read_text())["classes"])
    model = build_model(run, num_classes, None)
    if args.compile:
        model = torch.compile(model)
    losses_module = build_loss_modules(run, num_classes)
    weights = loss_weights(run, losses_module)
    optimizer, parameters = build_optimizer(run, model, losses_module)
    main_loss, similarity = loss_parts(losses_module)
    batches = iter(infinite_loader(build_dataset(run, inputs), run.train.batch_size, 0, run.train.seed))
    device = torch.device("cpu")

    def step(batch: dict) -> dict[str, float]:  # engine/train.py's step, timed in parts
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if args.cpu_bf16 else contextlib.nullcontext():
            outputs = forward(model, batch, run, device)
        t1 = time.perf_counter()
        loss = total_loss(step_losses(main_loss, similarity, outputs, batch), weights)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, run.train.clip_grad_norm)
        optimizer.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "matching + losses": t2 - t1, "backward + optimiser": t3 - t2}

    warm_up = time.perf_counter()
    for _ in range(3):
        step(next(batches))
    warm_up = time.perf_counter() - warm_up
    totals = {"data": 0.0, "forward": 0.0, "matching + losses": 0.0, "backward + optimiser": 0.0}
    images = 0
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None
    if profiler is not None:
        profiler.start()
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        totals["data"] += time.perf_counter() - t0
        for key, value in step(batch).items():
            totals[key] += value
        images += batch["images"].shape[0]
    elapsed = time.perf_counter() - start
    if profiler is not None:
        profiler.stop()

    batch = next(batches)
    with FlopCounterMode(display=False) as counter:
        outputs = forward(model, batch, run, device)
        loss = total_loss(step_losses(main_loss, similarity, outputs, batch), weights)
        loss.backward()
    flops_per_image = counter.get_total_flops() / batch["images"].shape[0]
    peak = matmul_peak()
    achieved = flops_per_image * images / elapsed

    print(f"method {args.method}, batch {run.train.batch_size}, {args.threads} threads, {args.steps} steps")
    rate = f"{images / elapsed:.1f} images/s, {elapsed / args.steps * 1000:.0f} ms/step"
    print(f"  {rate} (the 3 warm-up steps: {warm_up:.1f} s)")
    print(f"  model forward+backward: {flops_per_image / 1e9:.3f} GFLOP/image")
    print(f"  achieved {achieved / 1e9:.2f} GFLOP/s of a {peak / 1e9:.1f} GFLOP/s matmul peak = {achieved / peak:.1%}")
    print("  where the step goes:")
    for key, value in totals.items():
        print(f"    {key:22s} {value / elapsed:6.1%}")
    if profiler is not None:
        # The profiler's own overhead inflates the many small operators a little; read shares, not times.
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))


if __name__ == "__main__":
    main()
