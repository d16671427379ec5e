"""SynFlow: data-free salience from the "synaptic flow" of an all-ones input through |θ| with linearised activations.

score = |W ⊙ ∂R/∂W|, R = sum of the model's outputs, computed with every parameter replaced by its absolute value
(signs restored exactly afterwards), activation modules turned into identities (torch.nn and transformers activation
modules; activations called as plain functions, and softmax/normalisation layers, stay as they are) and the input
embeddings (or, for models without them, every floating input of one batch) set to ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..layer import is_quantized
from .context import SalienceContext
from .gradients import captured_gradients, forward_hooks, frozen_eval, merged_deltas

_NOT_ACTIVATIONS = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention)
SYNFLOW_SEQUENCE_LENGTH = 16


def _is_activation(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__module__ in ("torch.nn.modules.activation", "transformers.activations") and not isinstance(
        module, _NOT_ACTIVATIONS
    )


@contextlib.contextmanager
def _linearised(model: nn.Module) -> Iterator[None]:
    """Activation modules return their input inside the block."""
    with forward_hooks((module, lambda module, args, output: args[0])
                       for module in model.modules() if _is_activation(module)):
        yield


@contextlib.contextmanager
def _absolute_parameters(model: nn.Module) -> Iterator[None]:
    """Every floating parameter and buffer holds |value| inside the block; the signs are restored exactly."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    signs = []
    with torch.no_grad():
        for tensor in tensors:
            signs.append(torch.signbit(tensor))
            tensor.abs_()
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, negative in zip(tensors, signs):
                tensor[negative] = -tensor[negative]


def _ones_inputs(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    model = ctx.model
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        weight = embeddings.weight
        shape = (1, SYNFLOW_SEQUENCE_LENGTH, weight.shape[1])
        return {"inputs_embeds": torch.ones(shape, dtype=weight.dtype, device=weight.device)}
    if ctx.dataloader is None:
        raise ValueError(
            "synflow needs either a model with input embeddings (transformers models) or one batch to learn the "
            "input shapes from; pass a dataloader."
        )
    batch = next(iter(ctx.dataloader))
    return {key: torch.ones_like(value) if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in batch.items() if key != "labels"}


def _output_tensor(outputs) -> torch.Tensor:
    if torch.is_tensor(outputs):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError("synflow needs a model that returns a tensor or `logits`.")
    return logits


def synflow(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """|W ⊙ ∂R/∂W| of the synaptic-flow objective (see the module docstring)."""
    if ctx.model is None:
        raise ValueError("synflow needs the model; pass it to compute_salience.")
    quantized = [name for name, module in ctx.layers.items()
                 if is_quantized(module.get_base_layer() if hasattr(module, "get_base_layer") else module)]
    if quantized:
        raise ValueError(f"synflow replaces every weight by its absolute value, which quantized (bitsandbytes) "
                         f"weights such as {quantized[0]!r} cannot do; use another measure (e.g. 'gradient').")
    grads: dict[str, torch.Tensor] = {}

    def store(name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        grads[name] = grad_out.reshape(-1, grad_out.shape[-1]).double().t() @ x.reshape(-1, x.shape[-1]).double()

    inputs = _ones_inputs(ctx)
    with frozen_eval(ctx.model), torch.enable_grad(), merged_deltas(ctx), _absolute_parameters(ctx.model), \
            _linearised(ctx.model), captured_gradients(ctx, store):
        _output_tensor(ctx.model(**inputs)).double().sum().backward()
        weights = {name: ctx.weight(name) for name in ctx.layers}
    return {name: ctx.score_tensor((weights[name].double() * grads[name]).abs(), ctx.layers[name])
            for name in ctx.layers}
