"""bitsandbytes 8-bit and 4-bit base layers: dequantised reads, and merges by dequantise → add → requantise.

SPEFT wraps `bnb.nn.Linear8bitLt` / `bnb.nn.Linear4bit` in `hf_speft.quantized.QuantizedLinear`, whose transient
merge computes with `compute_weight` (a dequantized copy per product, as bitsandbytes' own training product makes);
the unmerged forward calls the quantized base layer and adds the sparse correction. This module is only imported when
a quantized base is met.

4-bit weights come in two layouts. The standard one (`quant_state.shape`-ordered nibbles, absmax per block) is what
`bitsandbytes.functional.dequantize_4bit` reads. On CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit`'s
weight for its own CPU kernel the first time it runs in inference (`quant_state.packing_format_for_cpu`): nibbles
reordered in 32-row blocks, absmax transposed to bf16. Every read here goes through bitsandbytes' own conversion back
to the standard layout, on a copy, so the layer itself is never changed by a read (`compat.standard_layout_copy`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from .compat import is_cpu_packed, standard_layout_copy


OPTIONAL_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _is_not_optional_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(OPTIONAL_KERNEL_NOTICE)


def quiet_optional_kernel_notice() -> None:
    """Drop the warning bitsandbytes logs on import on AVX512-BF16 CPUs when its optional Hub kernel (`kernels`) is
    absent: it falls back to its own CPU kernel, and peft imports bitsandbytes whenever it is installed, so every
    command (`hf-speft --help` too) would print it. Installed before peft is imported; other messages pass."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _is_not_optional_kernel_notice not in logger.filters:
        logger.addFilter(_is_not_optional_kernel_notice)


def dequantized_weight(base_layer: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of a quantized layer as a float32 copy, in either 4-bit layout."""
    weight = base_layer.weight
    if is_cpu_packed(weight):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(*standard_layout_copy(weight)).detach().float()
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(base_layer).detach().float()


def quantization_state(base_layer: nn.Module) -> tuple[Any, ...]:
    """What restoring the layer exactly needs: the weight parameter and, for 8-bit layers, the int8 matrices and
    scales held by the weight and by the layer's state (bitsandbytes moves them between the two)."""
    weight, state = base_layer.weight, getattr(base_layer, "state", None)
    return (weight, getattr(weight, "CB", None), getattr(weight, "SCB", None), getattr(state, "CB", None),
            getattr(state, "SCB", None))


def restore_quantization_state(base_layer: nn.Module, saved: tuple[Any, ...]) -> None:
    weight, weight_cb, weight_scb, state_cb, state_scb = saved
    base_layer.weight = weight
    if hasattr(base_layer, "state"):
        weight.CB, weight.SCB = weight_cb, weight_scb
        base_layer.state.CB, base_layer.state.SCB = state_cb, state_scb


def write_requantized(base_layer: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's weight by `weight` (float, (out, in)) quantized the same way; warns that rounding may
    erase part of a sparse delta (merge into an unquantized copy of the base to keep it exactly)."""
    import bitsandbytes as bnb

    warnings.warn(
        "Merging a SPEFT delta into a quantized base requantizes the weight: rounding may change or erase small "
        "deltas. For an exact merge, load the base unquantized and merge there (or use `hf-speft merge`).",
        stacklevel=3,
    )
    old = base_layer.weight
    if type(old).__name__ == "Int8Params":
        base_layer.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base_layer.state.reset_grads()
    else:
        # A packed (CPU kernel) weight is replaced by a standard-layout one; bitsandbytes repacks it when it next runs.
        options = {key: getattr(old, key) for key in ("blocksize", "compress_statistics", "quant_type",
                                                      "quant_storage", "module") if hasattr(old, key)}
        base_layer.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, **options).to(old.device)


def compute_weight(base_layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A fresh (out_features, in_features) copy of a quantized layer's weight in `dtype`, dequantized as bitsandbytes'
    own CPU/XPU training product does (8-bit: CB·SCB/127, `MatMul8bitFp`; 4-bit: `dequantize_4bit`), so a product with
    it is the layer's own. Reads either 4-bit layout and never changes the layer."""
    weight = base_layer.weight
    if type(weight).__name__ == "Int8Params":
        state = base_layer.state  # bitsandbytes moves CB/SCB from the weight to the state on the first forward
        cb = state.CB if state.CB is not None else weight.CB
        scb = state.SCB if state.SCB is not None else weight.SCB
        if cb is None or scb is None:  # has_fp16_weights: not quantized yet
            return dequantized_weight(base_layer).to(dtype)
        return cb.to(dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    from bitsandbytes.functional import dequantize_4bit

    data, state = standard_layout_copy(weight) if is_cpu_packed(weight) else (weight.data, weight.quant_state)
    return dequantize_4bit(data, state).to(dtype)


def compute_dtype(base_layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the quantized layer computes its product in: a 4-bit layer's `compute_dtype`, else the input's."""
    return getattr(base_layer, "compute_dtype", None) or x.dtype
