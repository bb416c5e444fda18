"""Starting a training job on the GPUs it was given: one device per job on a workstation, torchrun for N.

Snakemake counts GPUs (``--resources gpu=N`` in profiles/gpu) but does not say *which* device a job may use,
so two jobs would both land on GPU 0. :func:`claim_gpus` picks free devices with one lock file per GPU and
sets ``CUDA_VISIBLE_DEVICES`` before CUDA starts; the locks are held until the job's processes exit (the
kernel drops them even after a kill). Where a scheduler already chose the devices (SLURM sets
``CUDA_VISIBLE_DEVICES``) nothing is claimed.

:func:`exec_torchrun` replaces the process with ``torchrun --standalone --nproc-per-node N`` running the same
command, so ``python -m weakshot train --gpus N`` is the whole multi-GPU launch (signals from SLURM or
Snakemake reach torchrun, which stops its workers).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LOCK_DIR = Path("/tmp/weakshot-gpu-locks")


def installed_gpu_count() -> int:
    """NVIDIA GPUs of this machine, without starting CUDA (the driver lists one folder per device)."""
    root = Path("/proc/driver/nvidia/gpus")
    return len(list(root.iterdir())) if root.is_dir() else 0


@dataclass
class GpuClaim:
    devices: list[int]
    files: list = field(default_factory=list)  # open lock files: closing them (or exiting) releases the GPUs

    def release(self) -> None:
        for handle in self.files:
            handle.close()
        self.files.clear()


def claim_gpus(
    count: int,
    *,
    total: int | None = None,
    lock_dir: Path = DEFAULT_LOCK_DIR,
    poll_seconds: float = 5.0,
    timeout_seconds: float | None = None,
) -> GpuClaim | None:
    """Lock ``count`` free GPUs of this machine and make only them visible to this process and its children.

    Returns None (and changes nothing) when a scheduler already set ``CUDA_VISIBLE_DEVICES`` or when the
    machine has no more GPUs than asked for. Waits while fewer than ``count`` are free (more GPU jobs than
    GPUs: Snakemake was run without ``--resources gpu=N``), and raises ``TimeoutError`` after
    ``timeout_seconds``.
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    total = installed_gpu_count() if total is None else total
    if count < 1 or total <= count:
        return None
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited, announced = 0.0, False
    while True:
        claim = GpuClaim(devices=[])
        for device in range(total):
            handle = open(lock_dir / f"gpu{device}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            os.set_inheritable(handle.fileno(), True)  # held on through exec into torchrun and its workers
            claim.devices.append(device)
            claim.files.append(handle)
            if len(claim.devices) == count:
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, claim.devices))
                print(f"[launch] using GPU {os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
                return claim
        claim.release()
        if timeout_seconds is not None and waited >= timeout_seconds:
            raise TimeoutError(f"{lock_dir}: no {count} free GPU(s) of {total} after {waited:.0f} s")
        if not announced:
            print(f"[launch] waiting for {count} free GPU(s) of {total} ({lock_dir})", file=sys.stderr, flush=True)
            announced = True
        time.sleep(poll_seconds)
        waited += poll_seconds


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` (torchrun) running ``python -m weakshot <argv>`` on ``nproc`` ranks."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "weakshot", *argv,
    ]  # fmt: skip


def exec_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process by torchrun with ``nproc`` workers running the same command (does not return)."""
    command = torchrun_command(nproc, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
