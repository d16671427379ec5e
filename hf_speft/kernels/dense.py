"""The `dense` strategy: native-dtype GEMMs with a scatter or gather at the mask.

The forward correction and the input gradient scatter the values into a transient dense Δ in the compute dtype
(freed when the product returns). The values' gradient computes gᵀ·x over blocks of rows, gathering each block's
entries, so no weight-sized temporary lives at once (for weights above `CHUNK_ELEMENTS`) and nothing weight-sized
outlives the backward."""

from __future__ import annotations

import torch

from .pattern import Layout

CHUNK_ELEMENTS = 1 << 22  # the largest block of gᵀ·x the values' gradient holds at once


def _dense_delta(values: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    delta = torch.zeros(layout.out_features * layout.in_features, dtype=dtype, device=values.device)
    delta[layout.flat.to(torch.int64)] = values.to(dtype)
    return delta.view(layout.out_features, layout.in_features)


def forward(base: torch.Tensor, x: torch.Tensor, values: torch.Tensor, layout: Layout) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, base.dtype)
    delta = _dense_delta(values, layout, dtype)
    return torch.addmm(base.to(dtype), x.to(dtype), delta.t()).to(base.dtype)


def prepare(grad: torch.Tensor) -> torch.Tensor:
    return grad


def input_grad(grad: torch.Tensor, values: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    compute = torch.promote_types(grad.dtype, dtype)
    return (grad.to(compute) @ _dense_delta(values, layout, compute)).to(dtype)


def values_grad(grad: torch.Tensor, x: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    compute = torch.promote_types(grad.dtype, x.dtype)
    grad, x = grad.to(compute), x.to(compute)
    out_features, in_features = layout.out_features, layout.in_features
    flat = layout.flat.to(torch.int64)
    rows_per_chunk = max(1, min(out_features, CHUNK_ELEMENTS // in_features))
    if rows_per_chunk == out_features:
        return (grad.t() @ x).view(-1)[flat].to(dtype)
    # Which entries a block of rows holds is known only on the device: each block gathers at every entry (clamped)
    # and keeps its own, so nothing reads the indices on the host (no synchronisation; CUDA graphs can capture it).
    result = torch.zeros(layout.nnz, dtype=compute, device=x.device)
    for row in range(0, out_features, rows_per_chunk):
        block = (grad[:, row:row + rows_per_chunk].t() @ x).view(-1)  # (rows, in) of gᵀ·x
        local = flat - row * in_features
        inside = (local >= 0) & (local < block.numel())
        result = torch.where(inside, block[local.clamp(0, block.numel() - 1)], result)
    return result.to(dtype)
