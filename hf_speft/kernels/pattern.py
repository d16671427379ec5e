"""`SparsePattern`: the CSR layouts of a fixed mask, derived once, and the index helpers the layer shares."""

from __future__ import annotations

from typing import NamedTuple

import torch


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 for weights with fewer than 2**31 entries, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def transposed_positions(indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """int64 positions in Wᵀ's row-major storage of logical row-major (out, in) flat `indices` (GPT-2's Conv1D
    stores Wᵀ)."""
    indices = indices.to(torch.int64)
    rows = torch.div(indices, in_features, rounding_mode="floor")
    return (indices - rows * in_features) * out_features + rows


class Layout(NamedTuple):
    """The tensors of a `SparsePattern` as the kernels read them (custom ops take tensors, not objects): the flat
    sorted indices, Δ's CSR (crow, col) and Δᵀ's CSR (t_crow, t_col) with `t_order`, Δᵀ's entries in index order."""

    flat: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor
    t_order: torch.Tensor
    out_features: int
    in_features: int

    @property
    def nnz(self) -> int:
        return self.flat.numel()


class SparsePattern:
    """The CSR layout of a sparse (out_features, in_features) delta whose flat row-major indices are sorted.

    Holds `indices` itself (the layer's buffer, not a copy) and derives O(nnz + rows + cols) CSR structures of Δ and
    Δᵀ from it once; the mask is static between updates, so every kernel call reuses them."""

    def __init__(self, indices: torch.Tensor, out_features: int, in_features: int) -> None:
        self.shape = (out_features, in_features)
        self.nnz = indices.numel()
        self.indices = indices
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

    @staticmethod
    def state_bytes(nnz: int, out_features: int, in_features: int) -> int:
        """Bytes a SPEFT layer keeps for a mask of `nnz` entries besides its values: the flat index buffer plus this
        layout (its CSR structures)."""
        index = index_dtype_for(out_features * in_features).itemsize
        pointers = (out_features + 1 + in_features + 1) * index
        return nnz * 4 * index + pointers

    @staticmethod
    def _compressed(major: torch.Tensor, size: int) -> torch.Tensor:
        pointers = torch.zeros(size + 1, dtype=torch.int64, device=major.device)
        pointers[1:] = torch.bincount(major, minlength=size).cumsum(0)
        return pointers

    @property
    def layout(self) -> Layout:
        return Layout(self.indices, self.crow, self.col, self.transposed_crow, self.transposed_col,
                      self.transposed_order, *self.shape)

    def delta(self, values: torch.Tensor) -> torch.Tensor:
        """Δ as a CSR tensor of shape (out_features, in_features)."""
        return csr_delta(self.layout, values)


def csr_delta(layout: Layout, values: torch.Tensor) -> torch.Tensor:
    """Δ as a CSR tensor of shape (out_features, in_features)."""
    return torch.sparse_csr_tensor(layout.crow, layout.col, values, (layout.out_features, layout.in_features),
                                   check_invariants=False)


def csr_delta_transposed(layout: Layout, values: torch.Tensor) -> torch.Tensor:
    """Δᵀ as a CSR tensor of shape (in_features, out_features)."""
    return torch.sparse_csr_tensor(layout.t_crow, layout.t_col, values[layout.t_order],
                                   (layout.in_features, layout.out_features), check_invariants=False)
