"""`SparsePattern`: the CSR layouts of a fixed mask, derived once, and the index helpers the layer shares."""

from __future__ import annotations

from typing import NamedTuple, Optional

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

    Holds `indices` itself (the layer's buffer, not a copy) and derives O(nnz + rows + cols) CSR structures from it
    once; the mask is static between updates, so every kernel call reuses them. Δᵀ's structures are derived on the
    first `layout` that needs them: only the input gradient through an unfolded delta reads Δᵀ, so a folded layer
    (the default) never holds them."""

    def __init__(self, indices: torch.Tensor, out_features: int, in_features: int) -> None:
        self.shape = (out_features, in_features)
        self.nnz = indices.numel()
        self.indices = indices
        self.index_dtype = index_dtype_for(out_features * in_features)
        rows, cols = self._rows_and_columns()
        self.crow = self._compressed(rows, out_features).to(self.index_dtype)
        self.col = cols.to(self.index_dtype)
        self._transposed: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._no_transposed = (self.crow.new_empty(0),) * 3  # stands in for Δᵀ where no product reads it

    @staticmethod
    def state_bytes(nnz: int, out_features: int, in_features: int, transposed: bool = False) -> int:
        """Bytes a SPEFT layer keeps for a mask of `nnz` entries besides its values: the flat index buffer plus this
        layout's CSR structures of Δ, and of Δᵀ when `transposed` (an unfolded layer trained with an input
        gradient)."""
        index = index_dtype_for(out_features * in_features).itemsize
        pointers = (out_features + 1 + (in_features + 1 if transposed else 0)) * index
        return nnz * (4 if transposed else 2) * index + pointers

    def _rows_and_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.indices.to(torch.int64)
        rows = torch.div(flat, self.shape[1], rounding_mode="floor")
        return rows, flat - rows * self.shape[1]

    @staticmethod
    def _compressed(major: torch.Tensor, size: int) -> torch.Tensor:
        pointers = torch.zeros(size + 1, dtype=torch.int64, device=major.device)
        pointers[1:] = torch.bincount(major, minlength=size).cumsum(0)
        return pointers

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δᵀ's CSR structure (crow, col) and `order`, Δᵀ's entries in index order (the column-major order of Δ's
        entries), derived on first use and kept."""
        if self._transposed is None:
            rows, cols = self._rows_and_columns()
            order = torch.argsort(cols * self.shape[0] + rows)
            self._transposed = (self._compressed(cols, self.shape[1]).to(self.index_dtype),
                                rows[order].to(self.index_dtype), order.to(self.index_dtype))
        return self._transposed

    def layout_for(self, input_grad: bool) -> Layout:
        """The tensors a kernel reads; Δᵀ's only when the product computes an input gradient through Δ."""
        t_crow, t_col, t_order = self.transposed() if input_grad else self._no_transposed
        return Layout(self.indices, self.crow, self.col, t_crow, t_col, t_order, *self.shape)

    @property
    def layout(self) -> Layout:
        """Every structure, Δᵀ's included."""
        return self.layout_for(input_grad=True)

    def delta(self, values: torch.Tensor) -> torch.Tensor:
        """Δ as a CSR tensor of shape (out_features, in_features)."""
        return csr_delta(self.layout_for(input_grad=False), values)


def csr_delta(layout: Layout, values: torch.Tensor) -> torch.Tensor:
    """Δ as a CSR tensor of shape (out_features, in_features)."""
    return torch.sparse_csr_tensor(layout.crow, layout.col, values, (layout.out_features, layout.in_features),
                                   check_invariants=False)


def csr_delta_transposed(layout: Layout, values: torch.Tensor) -> torch.Tensor:
    """Δᵀ as a CSR tensor of shape (in_features, out_features)."""
    return torch.sparse_csr_tensor(layout.t_crow, layout.t_col, values[layout.t_order],
                                   (layout.in_features, layout.out_features), check_invariants=False)
