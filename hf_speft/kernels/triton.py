"""The `triton` strategy: `@triton.jit` kernels that read fp16/bf16 (and float32/float64) operands directly, in any
strides, and accumulate in float32 (float64 for float64 inputs), so no float32 copy of x or g is made.

- `_row_gather_kernel`: out[t, r] = base[t, r] + Σ_{j in row r} v[j]·a[t, col_j] over a CSR layout; it computes the
  forward correction (Δ's CSR, a = x) and the input gradient (Δᵀ's CSR, a = g, values read through `t_order`).
- `_sddmm_kernel`: the values' gradient, row-blocked: one program per row r of Δ reads g[:, r] once per token block
  and the x columns of a block of that row's entries.
Fixed-order reductions and no atomics: the results are deterministic. Written against Triton 3.6's language.
Importing this module imports Triton; `TRITON_INTERPRET=1` set before that runs the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pattern import Layout

BLOCK_ENTRIES = 32


@triton.jit
def _row_gather_kernel(out_ptr, base_ptr, a_ptr, values_ptr, crow_ptr, col_ptr, order_ptr, tokens,
                       stride_at, stride_ac, stride_bt, stride_br, stride_ot, stride_or,
                       HAS_BASE: tl.constexpr, HAS_ORDER: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    row = tl.program_id(0)
    t = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = t < tokens
    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_T,), dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        cols = tl.load(col_ptr + e, mask=e_mask, other=0).to(tl.int64)
        if HAS_ORDER:
            source = tl.load(order_ptr + e, mask=e_mask, other=0).to(tl.int64)
        else:
            source = e
        v = tl.load(values_ptr + source, mask=e_mask, other=0.0).to(ACC)
        a = tl.load(a_ptr + t[:, None] * stride_at + cols[None, :] * stride_ac,
                    mask=t_mask[:, None] & e_mask[None, :], other=0.0).to(ACC)
        acc += tl.sum(a * v[None, :], axis=1)
    if HAS_BASE:
        acc += tl.load(base_ptr + t * stride_bt + row * stride_br, mask=t_mask, other=0.0).to(ACC)
    tl.store(out_ptr + t * stride_ot + row * stride_or, acc.to(out_ptr.dtype.element_ty), mask=t_mask)


@triton.jit
def _sddmm_kernel(out_ptr, g_ptr, x_ptr, crow_ptr, col_ptr, tokens, stride_gt, stride_gr, stride_xt, stride_xc,
                  ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        cols = tl.load(col_ptr + e, mask=e_mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_E,), dtype=ACC)
        for t0 in range(0, tokens, BLOCK_T):
            t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            t_mask = t < tokens
            g = tl.load(g_ptr + t * stride_gt + row * stride_gr, mask=t_mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + t[:, None] * stride_xt + cols[None, :] * stride_xc,
                        mask=t_mask[:, None] & e_mask[None, :], other=0.0).to(ACC)
            acc += tl.sum(x * g[:, None], axis=0)
        tl.store(out_ptr + e, acc.to(out_ptr.dtype.element_ty), mask=e_mask)


def _accumulator(*tensors: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _token_block(tokens: int) -> int:
    return min(64, max(16, triton.next_power_of_2(tokens)))


def _row_gather(a, values, crow, col, order, rows: int, out_dtype: torch.dtype, base=None) -> torch.Tensor:
    tokens = a.shape[0]
    out = torch.empty(tokens, rows, dtype=out_dtype, device=a.device)
    block_t = _token_block(tokens)
    base_strides = base.stride() if base is not None else (0, 0)
    _row_gather_kernel[(rows, triton.cdiv(tokens, block_t))](
        out, base if base is not None else out, a, values, crow, col, order if order is not None else col, tokens,
        *a.stride(), *base_strides, *out.stride(), HAS_BASE=base is not None, HAS_ORDER=order is not None,
        ACC=_accumulator(a, values), BLOCK_T=block_t, BLOCK_E=BLOCK_ENTRIES)
    return out


def forward(base: torch.Tensor, x: torch.Tensor, values: torch.Tensor, layout: Layout) -> torch.Tensor:
    return _row_gather(x, values, layout.crow, layout.col, None, layout.out_features, base.dtype, base=base)


def prepare(grad: torch.Tensor) -> torch.Tensor:
    return grad


def input_grad(grad: torch.Tensor, values: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    return _row_gather(grad, values, layout.t_crow, layout.t_col, layout.t_order, layout.in_features, dtype)


def values_grad(grad: torch.Tensor, x: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    tokens = x.shape[0]
    out = torch.empty(layout.nnz, dtype=dtype, device=x.device)
    _sddmm_kernel[(layout.out_features,)](out, grad, x, layout.crow, layout.col, tokens, *grad.stride(), *x.stride(),
                                          ACC=_accumulator(grad, x), BLOCK_T=_token_block(tokens),
                                          BLOCK_E=BLOCK_ENTRIES)
    return out
