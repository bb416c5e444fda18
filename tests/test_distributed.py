"""Data-parallel training (DDP over torchrun, gloo on CPU): two ranks of batch b train the same model as one
process with batch 2b, and cross-image pairs never straddle ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY_MODEL, inputs, tiny_run

from weakshot.data.dataset import InfiniteBatchSampler
from weakshot.engine.distributed import World
from weakshot.engine.launch import claim_gpus, torchrun_command
from weakshot.engine.train import train

ROOT = Path(__file__).resolve().parents[1]


def run_cli(run, dataset, out_dir: Path, nproc: int) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "weakshot", "train", "--run-config", json.dumps(run.to_dict()),
        "--prepared", str(dataset["prepared"]), "--split", str(dataset["split"]),
        "--image-labels", str(dataset["image_labels"]), "--out-dir", str(out_dir),
        "--device", "cpu", "--threads", "1", "--gpus", str(nproc),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def comparable(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The part of a weight the loss determines. The key third of an attention input bias has an exactly zero
    gradient (softmax ignores a constant added to every key's score), so it holds nothing but rounding noise
    that Adam magnifies to the learning rate: it is left out."""
    if key.endswith("in_proj_bias"):
        third = tensor.shape[0] // 3
        return torch.cat([tensor[:third], tensor[2 * third :]])
    return tensor


def test_two_ranks_of_batch_b_train_the_model_of_one_rank_with_batch_2b(dataset, tmp_path):
    # Group norm and no dropout: with batch norm or dropout each rank draws its own statistics / masks, so the
    # two set-ups would differ by design, not by a bug. The set criterion with deep supervision and the
    # complementary loss exercises every cross-rank normaliser (masks, weighted queries, novel images).
    model = {**TINY_MODEL, "backbone": {**TINY_MODEL["backbone"], "norm": "gn"}, "dropout": 0.0, "norm_groups": 4}
    run = tiny_run(
        model=model,
        similarity={"pairing": "none"},
        train={"iterations": 3, "batch_size": 4, "checkpoint_every": 2, "clip_grad_norm": 0.0},
    )
    single = train(run, inputs(dataset, tmp_path / "one"), device="cpu")
    run_cli(run, dataset, tmp_path / "two", nproc=2)

    one, two = weights(single), weights(tmp_path / "two" / "model.pt")
    assert one.keys() == two.keys()
    for key in one:  # every tensor of the model, trained weights and buffers
        a, b = comparable(key, one[key]), comparable(key, two[key])
        if not a.is_floating_point():
            assert torch.equal(a, b), key
            continue
        # Summation order differs (two half batches, then a gradient all-reduce), so the gradients are equal
        # up to rounding. Adam's first steps are about lr * g / |g| per element, which lifts the rounding of
        # near-zero gradients towards lr: every element must agree well within one step.
        assert float((a - b).abs().max()) < 0.25 * run.train.lr, key
    # ... and the models did train (the comparison is not between two untouched initialisations).
    fresh = train(tiny_run(model=model, similarity={"pairing": "none"}, train={"iterations": 1, "batch_size": 4}),
                  inputs(dataset, tmp_path / "fresh"), device="cpu")  # fmt: skip
    changed = sum(not torch.equal(weights(fresh)[k], one[k]) for k in one if one[k].is_floating_point())
    assert changed > 0

    # The logged losses (rank means of global-batch means) agree, iteration 1 (the normalisers) and after the
    # updates (iterations 2-3).
    log_one = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    log_two = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert len(log_one) == len(log_two) == 3
    for a, b in zip(log_one, log_two):
        assert a.keys() == b.keys()
        for name in a:  # every term, final and auxiliary layers: the normalisers are the global batch's
            assert b[name] == pytest.approx(a[name], rel=1e-5), name


def test_cross_pair_training_runs_on_two_ranks(dataset, tmp_path):
    """SimNet's weights are averaged like the segmenter's; each rank holds whole (input, reference) pairs."""
    run = tiny_run(train={"iterations": 2, "batch_size": 2, "checkpoint_every": 1})
    run_cli(run, dataset, tmp_path / "cross", nproc=2)
    written = {p.name for p in (tmp_path / "cross").iterdir()}
    assert {"model.pt", "simnet.pt", "config.yaml", "train_log.jsonl"} <= written
    log = [json.loads(line) for line in (tmp_path / "cross" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all("loss_sim" in record for record in log)


def test_rank_shares_partition_each_global_batch():
    size, world = 8, 3
    with pytest.raises(ValueError, match="cannot be shared"):
        InfiniteBatchSampler(20, size, seed=0, world_size=world, rank=0)
    world = 4
    whole = iter(InfiniteBatchSampler(20, size, seed=0, start_iteration=5))
    shares = [
        iter(InfiniteBatchSampler(20, size, seed=0, start_iteration=5, rank=r, world_size=world)) for r in range(world)
    ]
    for _ in range(6):  # crosses epoch boundaries (20 items, 8 per batch)
        batch = next(whole)
        parts = [next(share) for share in shares]
        assert all(len(part) == size // world for part in parts)
        assert sum(parts, []) == batch


def test_world_of_one_and_batch_that_does_not_split():
    world = World()
    counts = torch.tensor([0.0, 2.5, 3.0])
    assert torch.equal(world.count_share(counts, torch.ones(3)), torch.tensor([1.0, 2.5, 3.0]))
    with pytest.raises(ValueError, match="batch_size 6 does not split evenly over 4"):
        World(rank=0, local_rank=0, size=4).local_batch(6)


def test_torchrun_command_relaunches_the_same_cli():
    command = torchrun_command(4, ["train", "--out-dir", "x", "--gpus", "4"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in command and command[-6:] == ["weakshot", "train", "--out-dir", "x", "--gpus", "4"]


def test_gpu_claims_take_distinct_free_devices(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    first = claim_gpus(1, total=3, lock_dir=tmp_path)
    assert first.devices == [0] and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    second = claim_gpus(2, total=3, lock_dir=tmp_path)
    assert second.devices == [1, 2] and os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(TimeoutError, match="no 1 free GPU"):
        claim_gpus(1, total=3, lock_dir=tmp_path, poll_seconds=0.01, timeout_seconds=0.05)
    first.release()
    third = claim_gpus(1, total=3, lock_dir=tmp_path)
    assert third.devices == [0]
    # A scheduler's choice is left alone; so is a machine with no more GPUs than asked for.
    assert claim_gpus(1, total=3, lock_dir=tmp_path) is None  # CUDA_VISIBLE_DEVICES is set now
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert claim_gpus(1, total=1, lock_dir=tmp_path) is None
    second.release()
    third.release()
