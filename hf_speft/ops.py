"""Sparse-delta kernels: y = base(x) + x·Δᵀ with Δ given by (indices, values), never materialising a dense Δ.

`SparsePattern` derives the CSR structures of a fixed mask once (O(nnz + rows + cols)); `sparse_delta` is the
autograd entry point. The forward computes Δ·xᵀ with Δ in CSR as stored and adds its transpose to the base output
(dense-times-sparse `x·Δᵀ` converts and sorts its sparse operand on every call). The backward computes the gradient
of the values only at the mask, with a sampled dense-dense matmul (SDDMM: `grad_values[j] = Σ_t g[t, row_j] ·
x[t, col_j]`), and saves nothing but the input `x` for it. Both backward products read one contiguous copy of gᵀ, as
CSR products on a strided operand are slower (benchmarks/memory_speed.py measures the kernels).
Half-precision inputs run the sparse kernels in float32 (CPU has no bf16/fp16 CSR kernels); the cast is transient.
"""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _no_autocast(device: torch.device):
    """Sparse kernels run in the compute dtype chosen here, not in an ambient autocast dtype (bf16 CSR has no CPU
    kernel)."""
    return torch.autocast(device_type=device.type, enabled=False)


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 for weights with fewer than 2**31 entries, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def transposed_positions(indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """int64 positions in Wᵀ's row-major storage of logical row-major (out, in) flat `indices` (GPT-2's Conv1D
    stores Wᵀ)."""
    indices = indices.to(torch.int64)
    rows = torch.div(indices, in_features, rounding_mode="floor")
    return (indices - rows * in_features) * out_features + rows


class SparsePattern:
    """The CSR layout of a sparse (out_features, in_features) delta whose flat row-major indices are sorted."""

    def __init__(self, indices: torch.Tensor, out_features: int, in_features: int) -> None:
        self.shape = (out_features, in_features)
        self.nnz = indices.numel()
        index_dtype = index_dtype_for(out_features * in_features)
        flat = indices.to(torch.int64)
        rows = torch.div(flat, in_features, rounding_mode="floor")
        cols = flat - rows * in_features
        self.crow = self._compressed(rows, out_features).to(index_dtype)
        self.col = cols.to(index_dtype)
        # Δᵀ's CSR structure: column-major order of the entries
        self.transposed_order = torch.argsort(cols * out_features + rows).to(index_dtype)
        self.transposed_crow = self._compressed(cols, in_features).to(index_dtype)
        self.transposed_col = rows[self.transposed_order].to(index_dtype)
        self._sampling_masks: dict[torch.dtype, torch.Tensor] = {}

    @staticmethod
    def state_bytes(nnz: int, out_features: int, in_features: int, values_itemsize: int = 4) -> int:
        """Bytes a SPEFT layer keeps for a mask of `nnz` entries besides its values: the flat index buffer plus this
        layout after a backward pass (its CSR structures and sampling mask). `values_itemsize` is the size of the
        compute dtype."""
        index = index_dtype_for(out_features * in_features).itemsize
        pointers = (out_features + 1 + in_features + 1) * index
        return nnz * (4 * index + values_itemsize) + pointers

    @staticmethod
    def _compressed(major: torch.Tensor, size: int) -> torch.Tensor:
        pointers = torch.zeros(size + 1, dtype=torch.int64, device=major.device)
        pointers[1:] = torch.bincount(major, minlength=size).cumsum(0)
        return pointers

    def delta(self, values: torch.Tensor) -> torch.Tensor:
        """Δ as a CSR tensor of shape (out_features, in_features)."""
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def delta_transposed(self, values: torch.Tensor) -> torch.Tensor:
        """Δᵀ as a CSR tensor of shape (in_features, out_features)."""
        shape = (self.shape[1], self.shape[0])
        return torch.sparse_csr_tensor(self.transposed_crow, self.transposed_col, values[self.transposed_order], shape,
                                       check_invariants=False)

    def sampled_product(self, grad_out_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(grad_outᵀ · x) at the mask positions, in index order; grad_out_t is (out, T), x is (T, in)."""
        mask = self._sampling_masks.get(grad_out_t.dtype)
        if mask is None:
            zeros = torch.zeros(self.nnz, dtype=grad_out_t.dtype, device=grad_out_t.device)
            mask = self._sampling_masks[grad_out_t.dtype] = self.delta(zeros)
        return torch.sparse.sampled_addmm(mask, grad_out_t, x, beta=0.0).values()


class _SparseDeltaFunction(torch.autograd.Function):
    """base_out + x·Δᵀ (or base_out unchanged when the delta is already folded into the base weight)."""

    @staticmethod
    def forward(ctx, base_out, x, values, pattern: SparsePattern, add_delta: bool):
        ctx.pattern, ctx.add_delta = pattern, add_delta
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(x, values if add_delta else None)
        if not add_delta:
            return base_out.view_as(base_out)
        compute_dtype = _compute_dtype(x.dtype)
        x2d = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        base2d = base_out.reshape(-1, base_out.shape[-1]).to(compute_dtype)
        with _no_autocast(x.device):  # (Δ·xᵀ)ᵀ: a CSR-times-dense product with Δ used as stored, transposed back
            out = torch.sparse.mm(pattern.delta(values.to(compute_dtype)), x2d.t()).t().contiguous().add_(base2d)
        return out.reshape(base_out.shape).to(base_out.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        compute_dtype = _compute_dtype(grad_out.dtype)
        g2d = grad_out.reshape(-1, grad_out.shape[-1]).to(compute_dtype)
        with _no_autocast(x.device):
            grad_x, grad_values = _SparseDeltaFunction._sparse_grads(ctx, x, values, g2d, compute_dtype)
        grad_base = grad_out if ctx.needs_input_grad[0] else None
        return grad_base, grad_x, grad_values, None, None

    @staticmethod
    def _sparse_grads(ctx, x, values, g2d, compute_dtype):
        pattern: SparsePattern = ctx.pattern
        grad_x = grad_values = None
        g_t = g2d.t().contiguous()  # one copy serves both sparse products, which are ~3x slower on a strided gᵀ
        if ctx.needs_input_grad[1] and ctx.add_delta:
            delta_t = pattern.delta_transposed(values.to(compute_dtype))
            grad_x = torch.sparse.mm(delta_t, g_t).t().contiguous().reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            x2d = x.reshape(-1, x.shape[-1]).to(compute_dtype)
            grad_values = pattern.sampled_product(g_t, x2d)
        return grad_x, grad_values


def sparse_delta(
    base_out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern, add_delta: bool = True
) -> torch.Tensor:
    """Return `base_out + x·Δᵀ` with gradients for `values` only at the mask (and for `x` through Δ).

    With `add_delta=False` the delta is assumed to be folded into the weight that produced `base_out`: the output is
    `base_out` and only the values' gradient is added in backward.
    """
    if pattern.nnz == 0:
        return base_out
    return _SparseDeltaFunction.apply(base_out, x, values, pattern, add_delta)
