"""How the sparse delta reaches the base product when it is folded: a scoped fold.

W0+Δ exists in the base weight only while the layer's own base GEMM runs: `FoldedProduct` writes W0+Δ at the mask
positions, runs the base product and writes the saved original entries back in `finally` — in the forward, and again
around the input-gradient GEMM in the backward. At every other moment (between forward and backward, between steps,
after an exception, for another reader of the same weight) the base weight holds W0 bit for bit, so nothing needs
restoring on save, read, `disable_adapter` or merge, and no end-of-backward callback exists to be missed.

Writes go through `.data` (no version bump): the weight is W0 whenever the op is not running, which is what a pending
graph saved. The op saves the weight itself, so a versioned write from outside between forward and backward raises
autograd's "modified by an inplace operation" instead of giving a silently wrong gradient.

Numerics are mixed-precision training's: the folded entries are round_to_base_dtype(W0[idx] + values), summed in at
least float32 from the saved originals (one rounding, never accumulated in half precision) — the weight a merge of
the adapter writes (`entries_with_delta`), and the bf16 copy of fp32 master weights that AMP computes with. The
values' gradient is the exact gᵀx at the mask, computed in the same backward by the sparse kernels
(`ops.sparse_values_grad`): one autograd node per layer, and no copy of the output to hang it on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.pytorch_utils import Conv1D

from .integrations.compat import has_call_hooks, is_partitioned
from .ops import SparsePattern, input_for_values_grad, sparse_values_grad

FOLDABLE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LOCKS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # base weight -> the lock its folds take
_LOCKS_LOCK = threading.Lock()


def fold_blocker(base_layer: nn.Module, *args: Any, **kwargs: Any) -> Optional[str]:
    """Why the delta cannot be folded into this base layer's product (None: it can). The fold computes the base
    product itself (the class's own `forward`, without `__call__`), so it needs a plain `nn.Linear`/`Conv1D` with no
    hooks (accelerate offload and others expect to see the call and may swap the weight) and a frozen, dense,
    floating-point `nn.Parameter` that owns its whole storage (not a view into an FSDP flat parameter or all-gather
    buffer, a DeepSpeed ZeRO-3 partition, a quantized or meta tensor)."""
    if type(base_layer) not in (nn.Linear, Conv1D) or args or kwargs:
        return f"its base layer is a {type(base_layer).__name__}, not a plain nn.Linear or Conv1D called on x alone"
    if has_call_hooks(base_layer):
        return "its base layer has hooks (e.g. accelerate's offload) that must see the base layer's own call"
    weight = base_layer.weight
    if type(weight) is not nn.Parameter or is_partitioned(weight) or weight.is_meta:
        return "its base weight is quantized, sharded (ZeRO-3, FSDP2) or on the meta device"
    if weight.dtype not in FOLDABLE_DTYPES:
        return f"its base weight's dtype {weight.dtype} is not one of {FOLDABLE_DTYPES}"
    if weight.requires_grad:
        return "its base weight is trainable"
    if not weight.is_contiguous() or weight.untyped_storage().nbytes() != weight.numel() * weight.element_size():
        return "its base weight is a view into a larger storage (e.g. an FSDP flat parameter)"
    return None


def entries_with_delta(original: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """round_to(original.dtype)(original + values), summed in at least float32: the entries of W0+Δ that a fold and
    a merge write (one rounding of the sum, so a bf16 base gets what a bf16 merge of fp32 values gives)."""
    dtype = torch.promote_types(torch.promote_types(original.dtype, values.dtype), torch.float32)
    return (original.to(dtype) + values.to(dtype)).to(original.dtype)


def flat_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base weight's storage as a flat view through `.data` (writes to it bump no version counter)."""
    weight = base_layer.weight
    if type(weight) is not nn.Parameter or is_partitioned(weight) or not weight.is_contiguous():
        raise ValueError(
            f"Cannot write the sparse delta into the base weight of {type(base_layer).__name__}: it is quantized, "
            "sharded or not contiguous."
        )
    return weight.data.view(-1)


def _lock(weight: torch.Tensor) -> threading.Lock:
    with _LOCKS_LOCK:
        lock = _LOCKS.get(weight)
        if lock is None:
            lock = _LOCKS[weight] = threading.Lock()
        return lock


@contextlib.contextmanager
def folded(weight: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """W[positions] = W0[positions] + values (`entries_with_delta`) for the block's duration, then W0's own bits
    again, whatever the block raises. A per-weight lock keeps two threads from saving each other's fold as W0."""
    flat = weight.data.view(-1)
    positions = positions.to(torch.int64)  # what index_copy_ (the fastest indexed write) takes; held as int32
    with _lock(weight):
        original = flat.index_select(0, positions)
        try:
            flat.index_copy_(0, positions, entries_with_delta(original, values))  # positions are unique: deterministic
            yield
        finally:
            flat.index_copy_(0, positions, original)


def _base_product(base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(base_layer).forward(base_layer, x)  # the class's own product; no hooks (`fold_blocker` checked)


class FoldedProduct(torch.autograd.Function):
    """The base layer's output computed with W0+Δ, and its input (and bias) gradient computed with W0+Δ too; the
    weight is folded only inside each of the two GEMMs. The trainable `values` (the mask's part of Δ) get gᵀx at
    the mask; the weight and the written `delta` (the values, and a frozen residual after them) get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, base_layer, positions, delta, pattern, kernel, x_kept_elsewhere):
        with folded(weight, positions, delta):
            out = _base_product(base_layer, x)
        trains_values = ctx.needs_input_grad[3]
        # the weight and the delta are saved so that a versioned write from outside before backward raises
        ctx.save_for_backward(weight, delta, input_for_values_grad(x, x_kept_elsewhere) if trains_values else None,
                              values if trains_values else None)
        ctx.positions, ctx.transposed = positions, isinstance(base_layer, Conv1D)
        ctx.pattern, ctx.kernel = pattern, kernel
        ctx.dtypes = (x.dtype, out.dtype, None if bias is None else bias.dtype)  # out: autocast's compute dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, delta, saved_x, values = ctx.saved_tensors
        x_dtype, compute_dtype, bias_dtype = ctx.dtypes
        grad_x = grad_bias = grad_values = None
        with torch.autocast(device_type=grad.device.type, enabled=False):  # the forward's dtype, as autocast's
            if ctx.needs_input_grad[0]:
                with folded(weight, ctx.positions, delta):
                    matrix = weight.to(compute_dtype)
                    grad_x = grad.to(compute_dtype) @ (matrix.t() if ctx.transposed else matrix)
                grad_x = grad_x.to(x_dtype)
            if ctx.needs_input_grad[2]:
                grad_bias = grad.sum(tuple(range(grad.dim() - 1))).to(bias_dtype)
        if ctx.needs_input_grad[3]:
            grad_values = sparse_values_grad(grad, saved_x, values, ctx.pattern, ctx.kernel)
        return grad_x, None, grad_bias, grad_values, None, None, None, None, None, None


def folded_product(base_layer: nn.Module, x: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor,
                   values: torch.Tensor, pattern: SparsePattern, kernel: str = "auto",
                   x_kept_elsewhere: bool = False) -> torch.Tensor:
    """`base_layer(x)` computed with the delta (`delta` at the storage `positions`) folded into its weight
    for the product only; differentiable in `x`, a trainable bias and `values` (the trainable entries, at
    `pattern`'s mask, that begin `delta`: their gradient is gᵀx there, by `kernel`), not in the weight.
    `x_kept_elsewhere`: another op saves x for its backward too (`ops.input_for_values_grad`)."""
    if not torch.is_grad_enabled():
        values = values.detach()  # no gradient wanted (evaluation): the op saves nothing for one
    return FoldedProduct.apply(x, base_layer.weight, base_layer.bias, values, base_layer, positions, delta.detach(),
                               pattern, kernel, x_kept_elsewhere)
