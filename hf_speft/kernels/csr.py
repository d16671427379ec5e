"""The `csr` strategy: torch's CSR kernels (`torch.sparse.mm` with Δ, and Δᵀ's cached layout; `sampled_addmm` at
the mask). Half precision runs in float32 (neither the CPU CSR kernels nor CUDA's `sampled_addmm` take fp16/bf16),
so x and g are copied to float32 for it: the automatic choice does not use it for CUDA half precision."""

from __future__ import annotations

import warnings

import torch

from .pattern import Layout, csr_delta, csr_delta_transposed

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    dtype = torch.promote_types(*dtypes) if len(dtypes) > 1 else dtypes[0]
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def forward(base: torch.Tensor, x: torch.Tensor, values: torch.Tensor, layout: Layout) -> torch.Tensor:
    dtype = compute_dtype(x.dtype, base.dtype)
    # (Δ·xᵀ)ᵀ: a CSR-times-dense product with Δ used as stored (x·Δᵀ would convert and sort Δ on every call)
    out = torch.sparse.mm(csr_delta(layout, values.to(dtype)), x.to(dtype).t()).t().contiguous()
    return out.add_(base.to(dtype)).to(base.dtype)


def prepare(grad: torch.Tensor) -> torch.Tensor:
    """One contiguous gᵀ serves both backward products (CSR products on a strided gᵀ are ~3x slower)."""
    return grad.to(compute_dtype(grad.dtype)).t().contiguous()


def input_grad(grad_t: torch.Tensor, values: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    delta_t = csr_delta_transposed(layout, values.to(grad_t.dtype))
    return torch.sparse.mm(delta_t, grad_t).t().contiguous().to(dtype)


def values_grad(grad_t: torch.Tensor, x: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    compute = compute_dtype(grad_t.dtype, x.dtype)
    mask = csr_delta(layout, torch.zeros(layout.nnz, dtype=compute, device=x.device))
    return torch.sparse.sampled_addmm(mask, grad_t.to(compute), x.to(compute), beta=0.0).values().to(dtype)
