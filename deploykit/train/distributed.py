"""torchrun support: process-group setup from the environment, DDP wrapping, and cross-rank helpers.

With ``WORLD_SIZE`` unset (or 1) every helper is a cheap no-op, so the same loop runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deploykit.errors import DeployKitError


@dataclass
class DistContext:
    """Where this process sits: its rank, the world size and its device."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Running under torchrun with more than one process."""
        return self.world_size > 1


def setup_distributed() -> DistContext:
    """Read torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``; init ``nccl`` on CUDA, ``gloo`` on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank if world > 1 else torch.cuda.current_device())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistContext(world, rank, local_rank, device)


def cleanup_distributed(ctx: DistContext) -> None:
    """Tear the process group down (torchrun waits for every rank to exit)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. while rank 0 validates and writes files)."""
    if ctx.is_distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few floats over ranks (loss totals, sample counts)."""
    if not ctx.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """One picklable object from each rank, in rank order (per-rank RNG states for the checkpoint)."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def unused_parameters(model: nn.Module, input_size: list[int], device: torch.device) -> list[str]:
    """Trainable parameters that get no gradient from the training loss, at the start and end of training.

    DDP hangs or errors when a parameter gets no gradient unless ``find_unused_parameters`` is set; that flag costs
    a graph walk per step, so it is only turned on when a probe on a dummy batch finds such parameters. Both ends of
    training are probed because methods may schedule loss weights (and skip exits whose weight is zero).
    """
    unused: set[str] = set()
    x = torch.zeros(2, *input_size, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    for progress in (0.0, 1.0):
        model.zero_grad(set_to_none=True)
        loss, _ = model.compute_loss(model(x), y, progress)
        loss.backward()
        unused |= {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    model.zero_grad(set_to_none=True)
    return sorted(unused)


def wrap_ddp(model: nn.Module, ctx: DistContext, input_size: list[int]) -> nn.Module:
    """Wrap in DistributedDataParallel (a no-op in one process)."""
    if not ctx.is_distributed:
        return model
    find_unused = bool(unused_parameters(model, input_size, ctx.device))
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def check_same_weights(model: nn.Module, ctx: DistContext) -> None:
    """Fail loudly if ranks ended with different weights (which would mean gradients were not synchronised)."""
    if not ctx.is_distributed:
        return
    with torch.no_grad():
        fingerprint = sum(float(p.double().abs().sum()) + float(p.double().sum()) for p in model.parameters())
    prints = all_gather_objects(fingerprint, ctx)
    if any(p != prints[0] for p in prints):
        raise DeployKitError(f"ranks disagree on the final weights (fingerprints {prints}); DDP sync failed")
