"""Salience under torch.distributed (DDP, accelerate): sums across ranks, so every rank selects the same mask and
that mask is the one a single process would select from all ranks' batches."""

from __future__ import annotations

import torch


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def summed_across_processes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor summed over all ranks (unchanged in a single process)."""
    if world_size() == 1:
        return tensors
    import torch.distributed as dist

    needs_cuda = dist.get_backend() == "nccl"
    summed = {}
    for name, value in tensors.items():
        buffer = value.float().to("cuda" if needs_cuda else value.device, copy=True)
        dist.all_reduce(buffer)
        summed[name] = buffer.to(device=value.device, dtype=value.dtype)
    return summed


def averaged_across_processes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor averaged over all ranks (unchanged in a single process)."""
    count = world_size()
    return {name: value / count for name, value in summed_across_processes(tensors).items()} if count > 1 else tensors
