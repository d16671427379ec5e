"""SPEFT on bitsandbytes 8-bit / 4-bit bases: the transient merge, how the delta reaches a quantized base product.

A quantized weight cannot hold W0+Δ, and bitsandbytes' own training product on CPU/XPU already dequantizes the weight
for every product (forward and input gradient) and discards it. The transient merge does the same with the delta in:

- forward: W = dequantize(W0) in the compute dtype (a fresh tensor), W[idx] = round_to_compute_dtype(W[idx] + values)
  (the sum in float32, one rounding: the weight a merge in the compute dtype gives), then one GEMM x·Wᵀ;
- backward: the input gradient g·W through the same merged weight, dequantized and merged again (never saved: only
  the O(nnz) indices and values are kept for backward); the values' gradient gᵀx at the mask by the sparse kernels'
  SDDMM (`sparse_values_grad`), exactly as unmerged.

So a step runs bitsandbytes' two dequantized GEMMs and the SDDMM, without the forward and input-gradient sparse
products; peak memory grows by at most one layer's dequantized weight, which bitsandbytes' own product allocates too.
Nothing is written into the layer: every reader sees the quantized weight at every moment.

`fold_weights` chooses, per adapter: True merges always, "auto" where it is the faster product (in training, and for
no-grad forwards of several tokens on the standard layouts: `QuantizedLinear.merges`), False never — except that a
packed 4-bit layer (bitsandbytes' AVX512-BF16 CPU layout) whose input needs a gradient always merges: bitsandbytes'
packed kernel has no backward and would drop the input gradient.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .integrations.bnb import compute_dtype, compute_weight
from .integrations.compat import is_cpu_packed
from .layer import Linear
from .ops import SparsePattern, input_for_values_grad, sparse_values_grad


def merged_weight(base_layer: nn.Module, indices: torch.Tensor, values: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """dequantize(W0) in `dtype` with W[indices] = round_to_dtype(W[indices] + values), the sum in float32 (or wider),
    on a fresh (out, in) tensor; `indices` are flat, unique, row-major."""
    weight = compute_weight(base_layer, dtype)
    flat = weight.view(-1)
    wide = torch.promote_types(dtype, torch.float32)
    flat.index_copy_(0, indices, (flat.index_select(0, indices).to(wide) + values.to(wide)).to(dtype))
    return weight


class TransientMergeFn(torch.autograd.Function):
    """x·(dequantize(W0) + Δ)ᵀ (+ bias) in `dtype`, with the input gradient through the same merged weight, rebuilt
    in backward, and gᵀx at the mask for the trainable `values` (which begin `delta`).

    Saves `indices`, `delta` and, when the values train, x (`input_for_values_grad`) and the values (O(nnz) besides
    x; `delta` is version-checked, so an in-place change between forward and backward raises)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor, bias: Optional[torch.Tensor],
                base_layer: nn.Module, dtype: torch.dtype, values: torch.Tensor, pattern: SparsePattern,
                kernel: str, x_kept_elsewhere: bool) -> torch.Tensor:
        trains_values = ctx.needs_input_grad[6]
        ctx.save_for_backward(indices, delta, input_for_values_grad(x, x_kept_elsewhere) if trains_values else None,
                              values if trains_values else None)
        ctx.base_layer = base_layer  # the module, not a tensor: nothing weight-sized stays alive
        ctx.dtypes, ctx.has_bias = (x.dtype, dtype), bias is not None
        ctx.pattern, ctx.kernel = pattern, kernel
        return nn.functional.linear(x.to(dtype), merged_weight(base_layer, indices, delta, dtype), bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        indices, delta, saved_x, values = ctx.saved_tensors
        x_dtype, dtype = ctx.dtypes
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(dtype) @ merged_weight(ctx.base_layer, indices, delta, dtype)).to(x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.to(dtype).reshape(-1, grad.shape[-1]).sum(0)
        if ctx.needs_input_grad[6]:
            grad_values = sparse_values_grad(grad, saved_x, values, ctx.pattern, ctx.kernel)
        return grad_x, None, None, grad_bias, None, None, grad_values, None, None, None


def transient_merge(layer: Linear, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of `layer` (a SPEFT layer on a quantized base) for `x` with the adapter's whole delta (mask,
    frozen residual, hybrid low-rank part) through the transient merge; gradients for x, the values and a trainable
    bias."""
    base_layer = layer.get_base_layer()
    dtype = compute_dtype(base_layer, x)
    indices, delta = layer.delta_entries(adapter_name)
    bias = base_layer.bias.to(dtype) if base_layer.bias is not None else None
    values = layer.speft_values.fetch(adapter_name)
    if not torch.is_grad_enabled():
        values = values.detach()  # no gradient wanted (evaluation): the op saves nothing for one
    result = TransientMergeFn.apply(x, indices, delta, bias, base_layer, dtype, values, layer.pattern(adapter_name),
                                    layer.speft_kernel.get(adapter_name, "auto"), adapter_name in layer.speft_lora_A)
    if adapter_name in layer.speft_lora_A:
        result = result + layer.low_rank_output(adapter_name, x).to(result.dtype)
    return result


class QuantizedLinear(Linear):
    """SPEFT on a bitsandbytes `Linear8bitLt` / `Linear4bit`: the plain forward (base product + sparse correction)
    or the transient merge (module docstring), chosen per forward by `merges`; everything else is `Linear`'s."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_name = None if args or kwargs else self.merges(x)
        if adapter_name is None:
            return super().forward(x, *args, **kwargs)
        return transient_merge(self, adapter_name, x)

    def merges(self, x: torch.Tensor) -> Optional[str]:
        """The adapter this forward merges transiently, or None for the plain forward: one calibrated active adapter,
        not disabled nor merged, whose `fold_weights` is True, or "auto" where the merge is the faster product, or
        any value on a packed 4-bit weight when x needs a gradient (the packed kernel has none).

        "auto" merges every forward with gradients and every no-grad forward of several tokens on a standard layout:
        there bitsandbytes dequantizes for its own product too. A no-grad forward of one token (a decoding step) or
        on the packed layout keeps bitsandbytes' product (its fused 4-bit kernel for one token on GPUs, its packed
        CPU kernel), which reads no dequantized copy, plus the sparse correction."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        active = self.calibrated_active_adapters()
        if not active:
            return None
        adapter_name = active[0]
        mode = self.speft_fold_weights.get(adapter_name, False)
        needs_input_grad = torch.is_grad_enabled() and x.requires_grad
        packed = is_cpu_packed(self.get_base_layer().weight)
        if mode is True or (packed and needs_input_grad):
            return adapter_name
        if mode == "auto" and not packed and (torch.is_grad_enabled() or x.numel() > x.shape[-1]):
            return adapter_name
        return None
