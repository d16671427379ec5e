"""Weight gradients of the targeted layers from hooks, and the measures built on them.

A forward hook keeps each target's input x and adds a zero probe that requires grad to its output (so the loss
back-propagates while every weight stays frozen); a tensor hook on the output receives grad_out and accumulates the
weight gradient grad_outᵀ·x into one score-sized buffer per layer. No `.grad` is ever created.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn

from .context import SalienceContext


def batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The mean loss the model returns for a batch; a clear error if the batch carries no labels."""
    outputs = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"The model returned no loss for a salience batch with keys {keys}; data-dependent salience needs "
            "batches with `labels` (e.g. from DataCollatorForLanguageModeling or a labelled classification set)."
        )
    return loss


@contextlib.contextmanager
def _captured_gradients(
    ctx: SalienceContext, on_gradient: Callable[[str, torch.Tensor, torch.Tensor], None]
) -> Iterator[None]:
    """Call `on_gradient(name, x, grad_out)` for every target during backward passes run inside the block."""
    probe = torch.zeros((), requires_grad=True)
    handles = []

    def forward_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].detach()
            output = output + probe.to(output.dtype)
            output.register_hook(lambda grad_out: on_gradient(name, x, grad_out.detach()))
            return output

        return hook

    try:
        for name, module in ctx.layers.items():
            handles.append(module.register_forward_hook(forward_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode with every parameter frozen, so backward creates no `.grad`; both restored afterwards."""
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        model.train(was_training)


def _run_backward_passes(ctx: SalienceContext, on_gradient, desc: str) -> None:
    if ctx.model is None:
        raise ValueError("Data-dependent salience needs the model; pass it to compute_salience/calibrate.")
    with _frozen_eval(ctx.model), torch.enable_grad(), _captured_gradients(ctx, on_gradient):
        for batch in ctx.batches(desc):
            batch_loss(ctx.model, batch).backward()


def mean_gradients(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """ḡ: the gradient of the mean loss, averaged over `num_batches` batches, per target (out, in), float32."""
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        grad = grad_out.reshape(-1, grad_out.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
        grad = grad.to(device=_device(ctx, name, grad))
        if name in sums:
            sums[name] += grad
        else:
            sums[name] = grad

    _run_backward_passes(ctx, accumulate, "salience (gradients)")
    return {name: sums[name] / ctx.num_batches for name in ctx.layers}


def mean_squared_sample_gradients(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """Mean over samples of g_i², where g_i is sample i's loss gradient (B·its share of the batch gradient)."""
    sums: dict[str, torch.Tensor] = {}
    counts = {"samples": 0}

    def accumulate(name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        batch_size = grad_out.shape[0]
        g3d = grad_out.reshape(batch_size, -1, grad_out.shape[-1]).float()
        x3d = x.reshape(batch_size, -1, x.shape[-1]).float()
        total = sums.get(name)
        for sample in range(batch_size):
            squared = (batch_size * g3d[sample].t() @ x3d[sample]).square_()
            squared = squared.to(device=_device(ctx, name, squared))
            total = squared if total is None else total.add_(squared)
        sums[name] = total
        if name == next(iter(ctx.layers)):
            counts["samples"] += batch_size

    _run_backward_passes(ctx, accumulate, "salience (per-sample gradients)")
    return {name: sums[name] / counts["samples"] for name in ctx.layers}


def _device(ctx: SalienceContext, name: str, like: torch.Tensor) -> torch.device:
    return ctx.device if ctx.device is not None else like.device


def gradient(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """|ḡ| — the paper's best measure."""
    return {name: ctx.score_tensor(g.abs(), ctx.layers[name]) for name, g in mean_gradients(ctx).items()}


def _weighted(ctx: SalienceContext, transform: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    scores = {}
    for name, g in mean_gradients(ctx).items():
        product = ctx.weight(name).to(g.device) * g
        scores[name] = ctx.score_tensor(transform(product), ctx.layers[name])
    return scores


def snip(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """|W ⊙ ḡ| (SNIP)."""
    return _weighted(ctx, torch.abs)


def taylor(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """(W ⊙ ḡ)² (first-order Taylor)."""
    return _weighted(ctx, torch.square)


def skeleton(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """−W ⊙ ḡ (skeletonization)."""
    return _weighted(ctx, torch.neg)


def fisher(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal: mean over samples of g_i²."""
    return {
        name: ctx.score_tensor(value, ctx.layers[name])
        for name, value in mean_squared_sample_gradients(ctx).items()
    }
