"""The `triton` strategy: coalesced `@triton.jit` kernels that read fp16/bf16 (and float32/float64) operands directly
and accumulate in float32 (float64 for float64 inputs).

Every kernel reads its dense operand *transposed*: one contiguous copy xᵀ (in, T) or gᵀ (out, T) per product, made
in the operand's own dtype, so that each mask entry's contribution walks one contiguous row along the tokens and
the lanes of a warp read consecutive addresses (vectorised loads when T is a multiple of 8). The tokens of a call
are split in blocks of `BLOCK_T`; each program owns one CSR row (or a block of `BLOCK_R` rows) and loops over that
row's entries in blocks of `BLOCK_E`, keeping a 2-D float32 partial sum in registers that is reduced once at the
end, so there are no per-iteration cross-lane reductions.

- `_spmm_kernel`: out[t, r] = base[t, r] + Σ_{j in row r} v[j]·aᵀ[col_j, t] over a CSR layout, for `BLOCK_R`
  consecutive rows × `BLOCK_T` tokens per program (a coalesced (T, BLOCK_R) store). It computes the forward
  correction (Δ's CSR, aᵀ = xᵀ) and the input gradient (Δᵀ's CSR, aᵀ = gᵀ, values read through `t_order`).
- `_sddmm_kernel`: the values' gradient, out[j] = Σ_t gᵀ[row_j, t]·xᵀ[col_j, t]; one program per CSR row (whose
  entries share that row of gᵀ) and chunk of `CHUNK_T` tokens, so the programs in flight read one chunk of xᵀ,
  which stays in L2 while the entries of other rows reuse it; the chunks' partial sums are added afterwards.
Fixed-order reductions and no atomics: the results are deterministic. The launch grids are one-dimensional
(`grid`), within CUDA's limits at any token count. Nothing here reads a tensor's values on the host: a steady-state
call makes no host synchronisation. Importing this module imports Triton; `TRITON_INTERPRET=1` set before that runs
the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pattern import Layout

BLOCK_E = 32  # entries per inner iteration
BLOCK_R = 16  # CSR rows per `_spmm_kernel` program (16 bf16 outputs = one 32-byte sector per token)
MAX_BLOCK_T = 128  # tokens per program: 4 warps × 32 lanes read one 256-byte bf16 row of aᵀ per entry
CHUNK_T = 512  # tokens per values'-gradient program: a chunk of xᵀ (in × 1 KiB in bf16) stays in L2
MAX_CHUNKS = 16
MAX_GRID = 2**31 - 1  # CUDA's limit of the first grid dimension (the others stop at 65,535)


@triton.jit
def _spmm_kernel(out_ptr, base_ptr, at_ptr, values_ptr, crow_ptr, col_ptr, order_ptr, rows, tokens, stride_at,
                 stride_bt, stride_br, stride_ot, stride_or,
                 HAS_BASE: tl.constexpr, HAS_ORDER: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    row_blocks = tl.cdiv(rows, BLOCK_R)
    pid = tl.program_id(0)
    first_row = (pid % row_blocks) * BLOCK_R  # row blocks vary fastest: concurrent programs share a token block
    t = (pid // row_blocks).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < tokens
    local = tl.arange(0, BLOCK_R)
    tile = tl.zeros((BLOCK_R, BLOCK_T), dtype=ACC)
    for i in range(BLOCK_R):
        row = tl.minimum(first_row + i, rows)  # rows past the end read crow[rows] twice: no entries
        start = tl.load(crow_ptr + row).to(tl.int64)
        end = tl.load(crow_ptr + tl.minimum(row + 1, rows)).to(tl.int64)
        partial = tl.zeros((BLOCK_E, BLOCK_T), dtype=ACC)
        for e0 in range(start, end, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            e_mask = e < end
            cols = tl.load(col_ptr + e, mask=e_mask, other=0).to(tl.int64)
            if HAS_ORDER:
                source = tl.load(order_ptr + e, mask=e_mask, other=0).to(tl.int64)
            else:
                source = e
            v = tl.load(values_ptr + source, mask=e_mask, other=0.0).to(ACC)
            a = tl.load(at_ptr + cols[:, None] * stride_at + t[None, :], mask=e_mask[:, None] & t_mask[None, :],
                        other=0.0).to(ACC)
            partial += a * v[:, None]
        tile = tl.where(local[:, None] == i, tl.sum(partial, axis=0)[None, :], tile)
    out_rows = first_row + local
    mask = (out_rows < rows)[:, None] & t_mask[None, :]
    if HAS_BASE:
        tile += tl.load(base_ptr + t[None, :] * stride_bt + out_rows[:, None] * stride_br, mask=mask,
                        other=0.0).to(ACC)
    tl.store(out_ptr + t[None, :] * stride_ot + out_rows[:, None] * stride_or, tile.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _sddmm_kernel(out_ptr, gt_ptr, xt_ptr, crow_ptr, col_ptr, rows, tokens, chunk_tokens, stride_chunk, stride_gt,
                  stride_xt, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid % rows).to(tl.int64)  # rows vary fastest: concurrent programs share one token chunk of xᵀ in L2
    chunk = pid // rows
    first = chunk * chunk_tokens
    last = tl.minimum(first + chunk_tokens, tokens)
    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        cols = tl.load(col_ptr + e, mask=e_mask, other=0).to(tl.int64)
        partial = tl.zeros((BLOCK_E, BLOCK_T), dtype=ACC)
        for t0 in range(first, last, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_mask = t < last
            g = tl.load(gt_ptr + row * stride_gt + t, mask=t_mask, other=0.0).to(ACC)
            x = tl.load(xt_ptr + cols[:, None] * stride_xt + t[None, :], mask=e_mask[:, None] & t_mask[None, :],
                        other=0.0).to(ACC)
            partial += x * g[None, :]
        tl.store(out_ptr + chunk.to(tl.int64) * stride_chunk + e, tl.sum(partial, axis=1).to(out_ptr.dtype.element_ty),
                 mask=e_mask)


def accumulator(*dtypes: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64 operands, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


_TL_ACCUMULATOR = {torch.float32: tl.float32, torch.float64: tl.float64}


def token_block(tokens: int) -> int:
    """Tokens per program: `MAX_BLOCK_T`, smaller (a power of two ≥ 16) for short calls."""
    return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(tokens)))


def grid(rows: int, tokens: int) -> tuple[int]:
    """`_spmm_kernel`'s one-dimensional launch grid: a program per block of `BLOCK_R` rows and of
    `token_block(tokens)` tokens. One dimension, whose limit is 2**31 - 1 (y and z stop at 65,535)."""
    programs = triton.cdiv(rows, BLOCK_R) * triton.cdiv(tokens, token_block(tokens))
    if programs > MAX_GRID:
        raise ValueError(f"{rows} rows × {tokens} tokens needs {programs} programs, above CUDA's {MAX_GRID}; "
                         f"split the call's tokens.")
    return (programs,)


def token_chunks(tokens: int) -> tuple[int, int]:
    """(chunks, tokens per chunk) of the values' gradient: chunks of `CHUNK_T` tokens, at most `MAX_CHUNKS` (their
    float32 partial sums, chunks × nnz, are added in a fixed order after the kernel)."""
    chunks, block = min(MAX_CHUNKS, triton.cdiv(tokens, CHUNK_T)), token_block(tokens)
    return chunks, triton.cdiv(triton.cdiv(tokens, chunks), block) * block


def sddmm_grid(rows: int, tokens: int) -> tuple[int]:
    """`_sddmm_kernel`'s one-dimensional launch grid: a program per CSR row and token chunk."""
    programs = rows * token_chunks(tokens)[0]
    if programs > MAX_GRID:
        raise ValueError(f"{rows} rows need {programs} programs, above CUDA's {MAX_GRID}.")
    return (programs,)


def transposed(a: torch.Tensor) -> torch.Tensor:
    """aᵀ as a contiguous (features, T) copy in a's dtype: the coalesced operand every kernel reads."""
    return a.t().contiguous()


def spmm_launch(out: torch.Tensor, at: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                order: torch.Tensor | None, base: torch.Tensor | None = None) -> tuple[tuple[int], tuple, dict]:
    """(grid, arguments, constexprs) of the `_spmm_kernel` launch computing `out` (T, rows) from aᵀ (features, T):
    what the strategy launches and what benchmarks/kernel_report.py compiles."""
    tokens, rows = out.shape
    base_strides = base.stride() if base is not None else (0, 0)
    arguments = (out, base if base is not None else out, at, values, crow, col, order if order is not None else col,
                 rows, tokens, at.stride(0), *base_strides, *out.stride())
    constexprs = dict(HAS_BASE=base is not None, HAS_ORDER=order is not None,
                      ACC=_TL_ACCUMULATOR[accumulator(at.dtype, values.dtype)], BLOCK_R=BLOCK_R,
                      BLOCK_T=token_block(tokens), BLOCK_E=BLOCK_E)
    return grid(rows, tokens), arguments, constexprs


def sddmm_launch(out: torch.Tensor, grad_t: torch.Tensor, x_t: torch.Tensor, crow: torch.Tensor,
                 col: torch.Tensor) -> tuple[tuple[int], tuple, dict]:
    """(grid, arguments, constexprs) of the `_sddmm_kernel` launch writing the values' gradient's partial sums `out`
    (chunks, nnz), `token_chunks(T)[0]` of them."""
    tokens, rows = x_t.shape[1], crow.numel() - 1
    arguments = (out, grad_t, x_t, crow, col, rows, tokens, token_chunks(tokens)[1], out.stride(0), grad_t.stride(0),
                 x_t.stride(0))
    constexprs = dict(ACC=_TL_ACCUMULATOR[accumulator(grad_t.dtype, x_t.dtype)], BLOCK_T=token_block(tokens),
                      BLOCK_E=BLOCK_E)
    return sddmm_grid(rows, tokens), arguments, constexprs


def _spmm(at: torch.Tensor, values, crow, col, order, rows: int, out_dtype: torch.dtype, base=None) -> torch.Tensor:
    out = torch.empty(at.shape[1], rows, dtype=out_dtype, device=at.device)
    if out.numel():
        launch_grid, arguments, constexprs = spmm_launch(out, at, values, crow, col, order, base)
        _spmm_kernel[launch_grid](*arguments, **constexprs)
    return out


def forward(base: torch.Tensor, x: torch.Tensor, values: torch.Tensor, layout: Layout) -> torch.Tensor:
    return _spmm(transposed(x), values, layout.crow, layout.col, None, layout.out_features, base.dtype, base=base)


def prepare(grad: torch.Tensor) -> torch.Tensor:
    """gᵀ (out, T), contiguous in g's dtype: one copy serves both backward products."""
    return transposed(grad)


def input_grad(grad_t: torch.Tensor, values: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    return _spmm(grad_t, values, layout.t_crow, layout.t_col, layout.t_order, layout.in_features, dtype)


def values_grad(grad_t: torch.Tensor, x: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    x_t = transposed(x)
    tokens = x_t.shape[1]
    if tokens == 0 or layout.nnz == 0:
        return torch.zeros(layout.nnz, dtype=dtype, device=x.device)
    partial = torch.empty(token_chunks(tokens)[0], layout.nnz, dtype=accumulator(grad_t.dtype, x_t.dtype),
                          device=x.device)
    launch_grid, arguments, constexprs = sddmm_launch(partial, grad_t, x_t, layout.crow, layout.col)
    _sddmm_kernel[launch_grid](*arguments, **constexprs)
    return partial.sum(0).to(dtype)  # a fixed-order reduction: deterministic
