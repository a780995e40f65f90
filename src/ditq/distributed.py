"""Multi-process sampling under ``torchrun``: each rank takes a contiguous slice of the sample
indices; rank 0 gathers the slices in index order. Because every sample draws from its own
seeded stream (:mod:`ditq.diffusion.pipeline`), the gathered result equals a single-process
run with the same seed."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str) -> Ranks:
    """Join the process group that ``torchrun`` describes (NCCL on GPUs, Gloo on CPUs);
    a plain run is rank 0 of 1 on ``device``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), world_size, device)


def shard(num_samples: int, ranks: Ranks) -> np.ndarray:
    """The sample indices of this rank: a contiguous slice, sizes differing by at most 1."""
    return np.array_split(np.arange(num_samples), ranks.world_size)[ranks.rank]


def gather(arrays: tuple[np.ndarray, ...], ranks: Ranks, scratch: Path) -> tuple[np.ndarray, ...]:
    """Concatenate every rank's arrays in rank order on rank 0 (other ranks get their own).

    Slices travel through ``.npy`` files in a scratch directory beside the output, so the
    size of a run is not bounded by what one collective message can carry.
    """
    if ranks.world_size == 1:
        return arrays
    scratch.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        np.save(scratch / f"rank{ranks.rank}_{i}.npy", array)
    dist.barrier()
    gathered = arrays
    if ranks.is_main:
        gathered = tuple(
            np.concatenate([np.load(scratch / f"rank{r}_{i}.npy") for r in range(ranks.world_size)])
            for i in range(len(arrays))
        )
        shutil.rmtree(scratch, ignore_errors=True)
    dist.barrier()
    return gathered


def scratch_dir(near: str | Path) -> Path:
    """A directory name beside ``near`` shared by all ranks of this run."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    return Path(tempfile.gettempdir() if near is None else Path(near).parent) / f".ditq-{run_id}"
