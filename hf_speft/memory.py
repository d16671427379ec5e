"""Per-GPU memory of fine-tuning a causal LM, estimated from its config alone (no weights are downloaded).

`estimate_memory` builds the model on the meta device (shapes, no storage) and wraps it with the method's real peft
code, so parameter counts and budgets are exact. State terms follow from the counts and the training set-up (AdamW,
ZeRO stage, quantized base). Activations are the bytes autograd saves in one forward, measured on the meta device for
one- and two-layer copies of the model and extrapolated to the full depth; attention is costed as FlashAttention
keeps it (q, k, v, output, log-sum-exp). Not included: the CUDA context and allocator fragmentation (plan ~1-2 GiB
per GPU for them), and communication buffers of DDP/ZeRO.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from .integrations.compat import set_attention_name
from .methods import METHODS, SPEFT_METHODS, method_peft_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAM_STATES = 2  # AdamW keeps two float32 moments per trainable parameter


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of each part of training, and the trainable-parameter count they follow from."""

    method: str
    trainable_params: int
    base_weight_bytes: int  # frozen weights (all weights for full fine-tuning)
    adapter_bytes: int  # trainable adapter tensors, plus SPEFT's index buffers and cached sparse layout
    gradient_bytes: int
    optimizer_bytes: int  # AdamW moments, plus float32 master weights where the weights are half precision
    activation_bytes: int  # saved for backward at the peak of one step

    @property
    def total_bytes(self) -> int:
        return (self.base_weight_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes)

    def as_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def estimate_memory(
    model_name_or_config: Union[str, Any],
    method: str = "speft",
    *,
    target_modules: Union[str, list[str]] = "all-linear",
    lora_r: int = 8,
    density: Optional[float] = None,
    num_params: Optional[int] = None,
    match_lora_rank: Optional[int] = None,
    zero_stage: int = 0,
    num_gpus: int = 1,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    seq_len: int = 512,
    batch_size: int = 1,
    dtype: str = "bfloat16",
    gradient_checkpointing: bool = True,
) -> MemoryEstimate:
    """Estimate per-GPU training memory of `method` on a causal LM given by a Hub id, a folder or a config.

    LoRA and PiSSA train rank `lora_r`; SPEFT trains the budget given by one of `density`, `num_params` or
    `match_lora_rank` (default: `match_lora_rank=lora_r`); `speft+lora` is SPEFT's hybrid mode at that budget, with a
    low-rank part of rank `methods.hybrid_lora_r(lora_r)`, as the recipes' `--method speft+lora`. `batch_size` is per
    GPU. ZeRO stage 1 shards optimizer state over `num_gpus`, stage 2 also gradients, stage 3 also weights.
    """
    _check_arguments(method, zero_stage, num_gpus, load_in_8bit, load_in_4bit, seq_len, batch_size, dtype)
    config = _config_of(model_name_or_config)
    weight_dtype = DTYPES[dtype]
    wrap = _method_wrapper(method, target_modules, lora_r, density, num_params, match_lora_rank)
    model = wrap(_meta_model(config, weight_dtype))
    quantization = "8bit" if load_in_8bit else "4bit" if load_in_4bit else None

    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable) + (_speft_budget(model) if method in SPEFT_METHODS else 0)
    quantizable = _quantizable_weights(model) if quantization else set()
    frozen_bytes = sum(_stored_bytes(p, quantization if id(p) in quantizable else None)
                       for p in model.parameters() if not p.requires_grad)
    frozen_bytes += sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "speft_" not in name)
    if method == "full":
        # the weights train in their dtype; half precision keeps a float32 master copy in the optimizer
        base, adapter_weights = trainable_params * weight_dtype.itemsize + frozen_bytes, 0
        gradients = trainable_params * weight_dtype.itemsize
        optimizer = trainable_params * 4 * (ADAM_STATES + (weight_dtype != torch.float32))
    else:
        # peft keeps adapter weights in float32 (under ZeRO-3 they stay in the base dtype, with a float32 master)
        adapter_dtype = weight_dtype if zero_stage == 3 else torch.float32
        base, adapter_weights = frozen_bytes, trainable_params * adapter_dtype.itemsize
        gradients = trainable_params * adapter_dtype.itemsize
        optimizer = trainable_params * 4 * (ADAM_STATES + (adapter_dtype != torch.float32))
    if zero_stage >= 1:
        optimizer //= num_gpus
    if zero_stage >= 2:
        gradients //= num_gpus
    if zero_stage == 3:
        base //= num_gpus
        adapter_weights //= num_gpus
    # buffers, which ZeRO does not shard; a ZeRO-3 base cannot fold, so its layers also hold Δᵀ's layout
    layout = _speft_layout_bytes(model, transposed=zero_stage == 3) if method in SPEFT_METHODS else 0
    traced = (lambda m: _as_traced_speft(wrap(m))) if method in SPEFT_METHODS else wrap
    activations = _activation_bytes(config, weight_dtype, traced, seq_len, batch_size, gradient_checkpointing)
    return MemoryEstimate(method, trainable_params, base, adapter_weights + layout, gradients, optimizer, activations)


# ------------------------------------------------------------------------------------------------ arguments
def _check_arguments(method, zero_stage, num_gpus, load_in_8bit, load_in_4bit, seq_len, batch_size, dtype) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; use one of {METHODS}.")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage!r} is not allowed; use 0, 1, 2 or 3.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; use one of {sorted(DTYPES)}.")
    for name, value in (("num_gpus", num_gpus), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if load_in_8bit and load_in_4bit:
        raise ValueError("Choose one of load_in_8bit and load_in_4bit.")
    if method == "full" and (load_in_8bit or load_in_4bit):
        raise ValueError("Full fine-tuning cannot train 8-bit or 4-bit weights.")
    if load_in_8bit and zero_stage == 3:
        raise ValueError("ZeRO-3 cannot shard bitsandbytes 8-bit weights; use load_in_4bit or zero_stage <= 2.")


def _config_of(model_name_or_config: Union[str, Any]):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_name_or_config, PretrainedConfig):
        return model_name_or_config
    return AutoConfig.from_pretrained(model_name_or_config)  # config.json only


# ------------------------------------------------------------------------------------------------ meta models
def _meta_model(config, dtype: torch.dtype, num_layers: Optional[int] = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        for name in ("layer_types", "mlp_layer_types"):  # per-layer lists must match the new depth
            if isinstance(getattr(config, name, None), list):
                setattr(config, name, getattr(config, name)[:num_layers])
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    set_attention_name(model, _FLASH_LIKE)  # see _flash_like_attention
    return model


def _method_wrapper(method, target_modules, lora_r, density, num_params, match_lora_rank) -> Callable:
    """The model → trainable-model function of `method` (peft's real wrappers; SPEFT stays uncalibrated)."""
    from peft import get_peft_model

    # PiSSA has LoRA's shapes; its SVD initialisation cannot run on the meta device
    budget = dict(density=density, num_params=num_params, match_lora_rank=match_lora_rank)
    peft_config = method_peft_config("lora" if method == "pissa" else method, target_modules=target_modules,
                                     lora_r=lora_r, salience="gradient", budget=budget)  # validates the budget
    if peft_config is None:
        return lambda model: model
    return lambda model: get_peft_model(model, copy.deepcopy(peft_config))  # uncalibrated: no mask is built


def _speft_budget(peft_model: nn.Module) -> int:
    return peft_model.base_model.adapter_budget("default")  # a budget too large for the targets errors here


def _as_traced_speft(peft_model: nn.Module) -> nn.Module:
    """Give the uncalibrated SPEFT layers the forward of a calibrated one as autograd sees it: `sparse_delta` saves
    the layer input (and nothing per token besides) whatever the mask; a hybrid adapter's low-rank part runs as is."""
    from .model import sparse_layers
    from .ops import sparse_delta

    class AnyPattern:  # sparse_delta only reads the layout in backward, which the estimate never runs
        nnz = 1

        def __init__(self, layer: nn.Module) -> None:
            self.shape = (layer.out_features, layer.in_features)

        def layout_for(self, input_grad: bool) -> list[torch.Tensor]:
            return [torch.zeros(1, dtype=torch.int64, device="meta")] * 6

    for layer in sparse_layers(peft_model, "default").values():
        values = nn.Parameter(torch.empty(1, device="meta"))

        def forward(x, *args, layer=layer, values=values, **kwargs):
            hybrid = "default" in layer.speft_lora_A
            out = sparse_delta(layer.base_layer(x, *args, **kwargs), x, values, AnyPattern(layer),
                               x_kept_elsewhere=hybrid)
            return out + layer.low_rank_output("default", x) if hybrid else out

        layer.forward = forward
    return peft_model


def _speft_layout_bytes(peft_model: nn.Module, transposed: bool) -> int:
    """Index buffers and the cached CSR layout of a SPEFT adapter's budget, spread over its layers by size; Δᵀ's
    layout too where `transposed` (unfolded layers)."""
    from .masking import local_budgets
    from .model import sparse_layers
    from .ops import SparsePattern

    layers = sparse_layers(peft_model, "default")
    counts = local_budgets({name: layer.out_features * layer.in_features for name, layer in layers.items()},
                           _speft_budget(peft_model))
    return sum(SparsePattern.state_bytes(counts[name], layer.out_features, layer.in_features, transposed)
               for name, layer in layers.items())


def _quantizable_weights(model: nn.Module) -> set[int]:
    """ids of the weights bitsandbytes quantizes: those of linear layers (and GPT-2's Conv1D), not the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skipped = {id(head.weight)} if head is not None else set()
    return {id(module.weight) for module in model.modules()
            if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) not in skipped}


def _stored_bytes(parameter: nn.Parameter, quantization: Optional[str]) -> int:
    """Bytes of a frozen weight, stored as is or quantized to `quantization`."""
    numel = parameter.numel()
    if quantization == "8bit":
        return numel + parameter.shape[0] * 4  # int8 weights and a float32 scale per row
    if quantization == "4bit":
        return numel // 2 + numel // 64 * 4  # two 4-bit weights per byte and a float32 absmax per 64-block
    return numel * parameter.element_size()


# ------------------------------------------------------------------------------------------------ activations
_FLASH_LIKE = "speft_flash_like"


class _FlashLikeAttention(torch.autograd.Function):
    """Attention on the meta device that saves exactly what FlashAttention keeps for backward."""

    @staticmethod
    def forward(ctx, query, key, value):
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        output = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        return output

    @staticmethod
    def backward(ctx, grad_output):  # never run: the estimate only traces the forward
        raise NotImplementedError


def _flash_like_attention(module, query, key, value, attention_mask, **kwargs):
    output = _FlashLikeAttention.apply(query, key, value)
    return output.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_FLASH_LIKE, _flash_like_attention)


def saved_for_backward_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward in one forward of `model(**batch)`: storages counted once, parameters and
    buffers excluded. Works on real and on meta tensors."""
    owned = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout not in (torch.strided, torch.sparse_coo):
            raise NotImplementedError(f"saved tensor of layout {tensor.layout}")
        parts = [tensor._indices(), tensor._values()] if tensor.layout == torch.sparse_coo else [tensor]
        for part in parts:
            storage = part.untyped_storage()
            if storage._cdata not in owned:
                storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(storages.values())


def _activation_bytes(config, dtype: torch.dtype, wrap: Callable, seq_len: int, batch_size: int,
                      gradient_checkpointing: bool) -> int:
    """Peak activation bytes of one step (gradients of the weights not included).

    Saved-for-backward bytes are measured for one and two layers and extrapolated linearly in depth. The peak comes
    at the start of backward, when the loss adds two float32 tensors of the logits' size (the gradients of the log
    probabilities and of the logits) to everything saved. With gradient checkpointing each layer keeps only its
    input hidden state, and one layer's activations are recomputed at a time, after the loss's gradients are freed.
    """
    _register_attention()
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "labels": ids}
    one, two = (saved_for_backward_bytes(wrap(_meta_model(config, dtype, depth)), batch) for depth in (1, 2))
    per_layer, outside_layers = two - one, 2 * one - two
    loss_gradients = 2 * batch_size * seq_len * config.vocab_size * 4
    if gradient_checkpointing:
        layer_inputs = config.num_hidden_layers * batch_size * seq_len * config.hidden_size * dtype.itemsize
        return outside_layers + layer_inputs + max(loss_gradients, per_layer)
    return outside_layers + config.num_hidden_layers * per_layer + loss_gradients
