"""Training checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint holds everything a killed run needs to continue exactly where it stopped: the model and
criterion state (the criterion owns SimNet), the optimiser state, the iteration, and the random-number
state of torch and Python. The data order needs no state: the loader derives it from (seed, iteration).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from weakshot.io_utils import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(
    path: Path,
    *,
    iteration: int,
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> None:
    state = {
        "iteration": iteration,
        "model": model.state_dict(),
        "criterion": criterion.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(_python_rng_state()),
        "extra": extra or {},
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state dict, as ``save_checkpoint`` wrote it; ``mmap`` reads tensors only when touched
    (enough to look at its iteration and extra)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a torn or foreign file: say which one
        raise RuntimeError(f"{path}: cannot read checkpoint ({err})") from None


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, criterion: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint in place; returns (iteration, extra)."""
    state = read_checkpoint(path)
    model.load_state_dict(state["model"])
    criterion.load_state_dict(state["criterion"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return int(state["iteration"]), state["extra"]


def _python_rng_state() -> tuple[int, list[int], float | None]:
    version, internal, gauss = random.getstate()
    return version, list(internal), gauss


def save_weights(path: Path, model: torch.nn.Module) -> None:
    """The final model: a plain state dict, loadable with ``weights_only=True``."""
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def load_weights(path: Path, model: torch.nn.Module, *, strict: bool = True) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model weights not found") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"{path}: weights do not fit the model (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
