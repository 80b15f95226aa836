"""Multi-process (DDP) training through ``torchrun``: who am I, and how to start the group.

``train.processes: N`` (N > 1) makes the train stage relaunch itself as
``python -m torch.distributed.run --standalone --nproc_per_node N stages/train.py ...``
(the same as running ``torchrun`` by hand).  Each process trains on its slice of every
global batch of ``train.batch_size`` samples; gradients are averaged by
:class:`torch.nn.parallel.DistributedDataParallel`.  Rank 0 alone validates, logs to
MLflow and writes checkpoints, curves and metrics.

Because every sample's randomness (support choice, augmentation, ICA) is drawn from
``(train.seed, epoch, sample index)``, the samples a run sees do not depend on the
number of processes: N processes with global batch B see exactly the batches one
process with batch B sees.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """The torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def init_process_group(ctx: DistContext, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()


def mean_across(ctx: DistContext, value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (every rank gets the same number)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def gather_across(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0, in rank order."""
    if not ctx.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def destroy(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(processes: int, script: str, args: list[str]) -> list[str]:
    """The command that relaunches ``script`` on ``processes`` local processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        script, *args,
    ]  # fmt: skip
