"""Distributed helpers: where this process stands in a torchrun launch, and the few collectives training needs.

torchrun starts one process per device and tells each its place in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``). Batch captioning reads it to pick its shard and device, training to join the process group. Like
torchvision's ``references/classification/utils.py``, everything distributed lives here, and every helper is a
no-op for a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "") or str(default)  # set but empty counts as unset
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


@dataclass(frozen=True)
class Launch:
    """This process' rank among ``world`` processes, and its device index on its machine (``local_rank``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes shared files and logs."""
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        """The launch torchrun describes in ``env`` (default ``os.environ``); a plain process is rank 0 of 1."""
        env = os.environ if env is None else env
        return cls(_env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1), _env_int(env, "LOCAL_RANK", 0))


def init_distributed(device_type: str) -> Launch:
    """Join the process group when launched by torchrun (NCCL on CUDA, else Gloo); returns this process' launch."""
    launch = Launch.from_env()
    if launch.world == 1:
        return Launch()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Launch(dist.get_rank(), launch.world, launch.local_rank)


def barrier(launch: Launch) -> None:
    """Wait for every rank."""
    if launch.world > 1:
        dist.barrier()


def average_gradients(parameters: Iterable[torch.nn.Parameter], launch: Launch) -> None:
    """Replace each gradient by its mean over the ranks (for steps DistributedDataParallel does not see)."""
    if launch.world > 1:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= launch.world


def broadcast_from_main(value: T, launch: Launch) -> T:
    """Rank 0's ``value`` on every rank."""
    if launch.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
