"""Sparse-delta kernels: y = base(x) + x·Δᵀ with Δ given by (indices, values), never materialising a dense Δ
beyond a transient one inside a product.

The one public front of the kernel layer (the strategies and the automatic choice live in `hf_speft.kernels`).
`sparse_delta` is the autograd entry point; it runs as two `torch.library` custom ops, so torch.compile, FSDP2 and
DeepSpeed see ordinary ops:
- `hf_speft::sparse_delta` returns `base_out + x·Δᵀ` (the forward correction) and saves nothing for backward but
  the input x, in the layout the values' gradient reads (`input_for_values_grad`), and the values (a parameter);
- `hf_speft::sparse_delta_backward` returns the input gradient g·Δ and the values' gradient (gᵀ·x at the mask only,
  an SDDMM). `sparse_values_grad` runs its second half alone, for a delta already in the product (a fold or a
  transient merge: `hf_speft.fold`, `hf_speft.quantized`).
Each product runs with the kernel asked for (`csr`, `dense`, `triton`) or, with `auto`, the one measured fastest
for its shape bucket (see `hf_speft.kernels.choice`). `$HF_SPEFT_KERNEL` overrides the kernel a config asks for.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

from .integrations.compat import is_view
from .kernels import KERNELS
from .kernels import choice as _choice
from .kernels.pattern import Layout, SparsePattern, index_dtype_for, transposed_positions

__all__ = ["KERNELS", "SparsePattern", "index_dtype_for", "input_for_values_grad", "kernel_choices", "sparse_delta",
           "sparse_values_grad", "transposed_positions"]

kernel_choices = _choice.kernel_choices


def _run(product: str, kernel: str, layout: Layout, operand: torch.Tensor, tokens: int,
         call: Callable[[str], torch.Tensor], measure: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """`call(kernel)`; for `auto` the chosen strategy's, whose failure (after its bucket's measurement validated it)
    raises an error naming it: no fallback, no host synchronisation, no collective."""
    if kernel != "auto":
        return call(kernel)
    bucket = (product, operand.device, operand.dtype, (layout.out_features, layout.in_features), layout.nnz, tokens)
    name = _choice.choose(*bucket, run=measure)
    try:
        return call(name)
    except Exception as error:
        raise _choice.steady_state_error(bucket, name, error) from error


@torch.library.custom_op("hf_speft::sparse_delta", mutates_args=())
def _forward_op(base_out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, layout: list[torch.Tensor],
                out_features: int, in_features: int, kernel: str, saved_x: torch.Tensor) -> torch.Tensor:
    """base_out + x·Δᵀ for 2-D `base_out` (T, out) and `x` (T, in). `saved_x` is x as the backward reads it
    (`input_for_values_grad`); the forward does not read it."""
    layout = Layout(*layout, out_features, in_features)
    with torch.autocast(device_type=x.device.type, enabled=False):  # kernels compute in the dtype they choose

        def forward(name: str) -> torch.Tensor:
            return _choice.strategy(name).forward(base_out, x, values, layout)

        return _run("forward", kernel, layout, x, x.shape[0], forward, forward)


@_forward_op.register_fake
def _(base_out, x, values, layout, out_features, in_features, kernel, saved_x):
    return torch.empty_like(base_out)


def _backward_products(grad: torch.Tensor, x: torch.Tensor, values: torch.Tensor, layout: list[torch.Tensor],
                       out_features: int, in_features: int, need_input_grad: bool, need_values_grad: bool,
                       kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(g·Δ, gᵀ·x at the mask) for 2-D `grad` (T, out) and `x` (T, in); an empty tensor for a gradient not needed."""
    layout = Layout(*layout, out_features, in_features)
    prepared: dict[str, object] = {}  # one prepared g per strategy serves both products (csr: one gᵀ copy)

    def prepare(name: str):
        if name not in prepared:
            prepared[name] = _choice.strategy(name).prepare(grad)
        return prepared[name]

    def input_grad(name: str, prepared_grad) -> torch.Tensor:
        return _choice.strategy(name).input_grad(prepared_grad, values, layout, x.dtype)

    def values_grad(name: str, prepared_grad) -> torch.Tensor:
        return _choice.strategy(name).values_grad(prepared_grad, x, layout, values.dtype)

    def backward_product(product: str, compute) -> torch.Tensor:
        """`compute` by the kernel (or the automatic choice), which is measured on a freshly prepared g."""
        return _run(product, kernel, layout, grad, grad.shape[0], lambda name: compute(name, prepare(name)),
                    lambda name: compute(name, _choice.strategy(name).prepare(grad)))

    empty = grad.new_empty(0)
    with torch.autocast(device_type=x.device.type, enabled=False):
        grad_x = backward_product("input_grad", input_grad) if need_input_grad else empty
        grad_values = backward_product("values_grad", values_grad) if need_values_grad else empty
    return grad_x, grad_values


_backward_op = torch.library.custom_op("hf_speft::sparse_delta_backward", mutates_args=())(_backward_products)


@_backward_op.register_fake
def _(grad, x, values, layout, out_features, in_features, need_input_grad, need_values_grad, kernel):
    input_grad = x.new_empty(x.shape) if need_input_grad else grad.new_empty(0)
    values_grad = values.new_empty(values.shape) if need_values_grad else grad.new_empty(0)
    return input_grad, values_grad


def _setup_context(ctx, inputs, output) -> None:
    _, x, values, layout, out_features, in_features, kernel, saved_x = inputs
    ctx.save_for_backward(saved_x, values)
    ctx.layout = layout  # the pattern's own tensors, held by the layer: not saved activations
    ctx.options = (out_features, in_features, kernel)


def _backward(ctx, grad):
    x, values = ctx.saved_tensors
    out_features, in_features, kernel = ctx.options
    need_input_grad = ctx.needs_input_grad[1]
    need_values_grad = ctx.needs_input_grad[2]
    grad_x = grad_values = None
    if need_input_grad or need_values_grad:
        grad_x, grad_values = _backward_op(grad, x, values, ctx.layout, out_features, in_features, need_input_grad,
                                           need_values_grad, kernel)
    return (grad if ctx.needs_input_grad[0] else None, grad_x if need_input_grad else None,
            grad_values if need_values_grad else None, [None] * len(ctx.layout), None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_delta(
    base_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    pattern: SparsePattern,
    kernel: str = "auto",
    x_kept_elsewhere: bool = False,
) -> torch.Tensor:
    """Return `base_out + x·Δᵀ` with gradients for `values` only at the mask (and for `x` through Δ).

    `kernel` is one of `KERNELS` (`$HF_SPEFT_KERNEL`
    overrides it); an explicit strategy is checked to be runnable on x's device before any work.
    `x_kept_elsewhere`: another op saves x for its backward too (see `input_for_values_grad`).
    """
    kernel = _choice.requested(kernel)
    if pattern.nnz == 0:
        return base_out
    _choice.check_available(kernel, x.device)
    out_features, in_features = pattern.shape
    x_2d = x.reshape(-1, in_features)
    trains = torch.is_grad_enabled() and values.requires_grad
    saved_x = input_for_values_grad(x, x_kept_elsewhere) if trains else x_2d
    layout = pattern.layout_for(input_grad=torch.is_grad_enabled() and x.requires_grad)
    out = _forward_op(base_out.reshape(-1, out_features), x_2d, values, list(layout[:6]), out_features,
                      in_features, kernel, saved_x)
    return out.reshape(base_out.shape)


_last_transposed = threading.local()  # .entry: (weakref to x, x's version, weakref to its copy)


def input_for_values_grad(x: torch.Tensor, x_kept_elsewhere: bool = False) -> torch.Tensor:
    """`x` (..., in) as the values' gradient will read it, 2-D (T, in) and detached, made in the forward (where x is
    fresh) and saved for the backward instead of x; forward products read x itself. Where it replaces x in memory,
    a view of a contiguous (in, T) copy: the layout in which every strategy reads x (CSR `sampled_addmm` and the
    Triton SDDMM walk each feature's tokens contiguously and would otherwise copy x so in the backward; a GEMM takes
    either). Layers called on one input (q, k and v; gate and up) share one copy: the last copy made in this thread
    is found again by x's identity and version, both held weakly, so nothing outlives its saved use.

    x itself where a copy would add to memory instead: when another op saves x too (`x_kept_elsewhere`: the hybrid
    mode's low-rank part), and when x is a view into another tensor's storage (attention's output, which attention
    saves, reaching o_proj)."""
    if x_kept_elsewhere:
        return x.detach().reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():  # a trace sees no views or Python state: the copy alone
        return x.detach().reshape(-1, x.shape[-1]).t().contiguous().t()
    if is_view(x) or x.is_inference():  # an inference tensor has no version to check
        return x.detach().reshape(-1, x.shape[-1])
    entry = getattr(_last_transposed, "entry", None)
    if entry is not None and entry[0]() is x and entry[1] == x._version:
        copy = entry[2]()
        if copy is not None:
            return copy.t()
    copy = x.detach().reshape(-1, x.shape[-1]).t().contiguous()
    _last_transposed.entry = (weakref.ref(x), x._version, weakref.ref(copy))
    return copy.t()


def sparse_values_grad(grad: torch.Tensor, x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern,
                       kernel: str = "auto") -> torch.Tensor:
    """gᵀ·x at the mask, in `values`' dtype and shape: the values' gradient of a delta that is already inside the
    product whose output gradient is `grad` (a fold or a transient merge), by the kernel asked for or the automatic
    choice, as `sparse_delta`'s backward computes it. Called from a backward: no graph of its own. Eager backwards
    call the op's function directly (the dispatcher's round trip costs more than a small layer's product); a trace,
    a tensor subclass or a double backward goes through the op."""
    kernel = _choice.requested(kernel)
    if pattern.nnz == 0:
        return torch.zeros_like(values)
    _choice.check_available(kernel, x.device)
    out_features, in_features = pattern.shape
    eager = (type(grad) is torch.Tensor and type(x) is torch.Tensor and not torch.is_grad_enabled()
             and not torch.compiler.is_compiling())
    layout = list(pattern.layout_for(input_grad=False)[:6])
    _, grad_values = (_backward_products if eager else _backward_op)(
        grad.reshape(-1, out_features), x.reshape(-1, in_features), values, layout, out_features, in_features, False,
        True, kernel)
    return grad_values
