"""Weight gradients of the targeted layers from hooks, and the measures built on them.

A forward hook keeps each target's input x and adds a zero probe that requires grad to its output (so the loss
back-propagates while every weight stays frozen); a tensor hook on the output receives grad_out and accumulates the
weight gradient grad_outᵀ·x into one score-sized buffer per layer. No `.grad` is ever created.

GraSP needs a Hessian-gradient product, so it differentiates twice: there, each target gets a zero (out, in) weight
probe P (output += x·Pᵀ), whose gradient is the weight gradient and can be differentiated again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from collections.abc import Callable

import torch
from torch import nn

from ..layer import SparsePeftLayer
from ..masking import top_k_of_all
from .context import SalienceContext
from .distributed import averaged_across_processes, summed_across_processes
from .losses import batch_rows, loss_terms


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Forward hooks registered on (module, hook) pairs for the block, removed afterwards (also on errors)."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adding(matrix: torch.Tensor) -> Callable:
    """A forward hook that adds x·matrixᵀ to the output, as if `matrix` were added to the weight."""
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + nn.functional.linear(args[0], matrix.to(args[0].dtype))

    return hook


@contextlib.contextmanager
def captured_gradients(
    ctx: SalienceContext, on_gradient: Callable[[str, torch.Tensor, torch.Tensor], None]
) -> Iterator[None]:
    """Call `on_gradient(name, x, grad_out)` for every target during backward passes run inside the block."""
    probe = torch.zeros((), requires_grad=True)

    def forward_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].detach()
            output = output + probe.to(output.dtype)
            output.register_hook(lambda grad_out: on_gradient(name, x, grad_out.detach()))
            return output

        return hook

    with forward_hooks((module, forward_hook(name)) for name, module in ctx.layers.items()):
        yield


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
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


def _run_backward_passes(ctx: SalienceContext, on_gradient: Callable[[str, torch.Tensor, torch.Tensor, int], None],
                         desc: str) -> None:
    """Back-propagate every salience batch (in micro-batch terms when configured), calling
    `on_gradient(name, x, grad_out, batch_rows)` per target and term; `batch_rows` is the whole batch's size."""
    if ctx.model is None:
        raise ValueError("Data-dependent salience needs the model; pass it to compute_salience/calibrate.")
    rows = 0

    def with_rows(name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        on_gradient(name, x, grad_out, rows)

    with frozen_eval(ctx.model), torch.enable_grad(), captured_gradients(ctx, with_rows):
        for batch in ctx.batches(desc):
            rows = batch_rows(batch)
            for loss in loss_terms(ctx.model, batch, ctx.micro_batch_size):
                loss.backward()


def _score_buffer(ctx: SalienceContext, name: str, like: torch.Tensor) -> torch.Tensor:
    """A zero (out, in) accumulator of one target in the score dtype, on the score device."""
    return torch.zeros(ctx.shape(name), dtype=ctx.dtype, device=_device(ctx, name, like))


def _add_product(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """total += left @ right, in place (no product-sized temporary when dtype and device already match)."""
    if total.dtype == left.dtype and total.device == left.device:
        total.addmm_(left, right)
    else:
        total.add_((left @ right).to(total.device))


def mean_gradients(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """ḡ: the gradient of the mean loss, averaged over the batches read, per target (out, in), accumulated in
    the score dtype on the score device."""
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str, x: torch.Tensor, grad_out: torch.Tensor, rows: int) -> None:
        grad_out = grad_out.reshape(-1, grad_out.shape[-1]).float()
        if name not in sums:
            sums[name] = _score_buffer(ctx, name, grad_out)
        _add_product(sums[name], grad_out.t(), x.reshape(-1, x.shape[-1]).float())

    _run_backward_passes(ctx, accumulate, "salience (gradients)")
    return averaged_across_processes({name: sums[name].div_(ctx.batches_used) for name in ctx.layers})


def mean_squared_sample_gradients(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """Mean over samples of g_i², where g_i is sample i's loss gradient (B·its share of the batch gradient, B the
    batch's rows), accumulated in the score dtype on the score device."""
    sums: dict[str, torch.Tensor] = {}
    counts = {"samples": 0}

    def accumulate(name: str, x: torch.Tensor, grad_out: torch.Tensor, rows: int) -> None:
        samples = grad_out.shape[0]
        g3d = grad_out.reshape(samples, -1, grad_out.shape[-1]).float()
        x3d = x.reshape(samples, -1, x.shape[-1]).float()
        if name not in sums:
            sums[name] = _score_buffer(ctx, name, g3d)
        for sample in range(samples):
            sums[name].add_((g3d[sample].t() @ x3d[sample]).mul_(rows).square_().to(sums[name].device))
        if name == next(iter(ctx.layers)):
            counts["samples"] += samples

    _run_backward_passes(ctx, accumulate, "salience (per-sample gradients)")
    sums = summed_across_processes({name: sums[name] for name in ctx.layers})
    samples = summed_across_processes({"samples": torch.tensor(float(counts["samples"]))})["samples"]
    return {name: value.div_(samples.item()) for name, value in sums.items()}


@contextlib.contextmanager
def _weight_probes(ctx: SalienceContext) -> Iterator[dict[str, torch.Tensor]]:
    """Zero (out, in) probes added to every target's weight (output += x·Pᵀ) inside the block."""
    probes = {name: torch.zeros(ctx.shape(name), device=ctx.weight(name).device, requires_grad=True)
              for name in ctx.layers}
    with forward_hooks((ctx.layers[name], _adding(probe)) for name, probe in probes.items()):
        yield probes


@contextlib.contextmanager
def merged_deltas(ctx: SalienceContext) -> Iterator[None]:
    """Merge the targets' active SPEFT deltas for the block (the sparse kernels have no second derivative); unmerge
    restores the base exactly."""
    merged = []
    try:
        for module in ctx.layers.values():
            if isinstance(module, SparsePeftLayer) and not module.merged and not module.disable_adapters:
                names = module.calibrated_active_adapters()
                if names:
                    module.merge(adapter_names=names)
                    merged.append(module)
        yield
    finally:
        for module in merged:
            module.unmerge()


def hessian_gradient_products(ctx: SalienceContext, direction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """H·v per target, averaged over batches, for the (out, in) `direction` v (H: Hessian of the loss in the targeted
    weights)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The fused attention kernels have no second derivative; the math kernel does.
    with frozen_eval(ctx.model), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), merged_deltas(ctx), \
            _weight_probes(ctx) as probes:
        tensors = list(probes.values())
        sums = {name: torch.zeros_like(probe) for name, probe in probes.items()}
        for batch in ctx.batches("salience (Hessian-gradient products)"):
            for loss in loss_terms(ctx.model, batch, ctx.micro_batch_size):
                grads = torch.autograd.grad(loss, tensors, create_graph=True)
                inner = sum((g * direction[name].to(g)).sum() for name, g in zip(probes, grads))
                for name, product in zip(probes, torch.autograd.grad(inner, tensors, allow_unused=True)):
                    if product is not None:
                        sums[name] += product.detach()
    return averaged_across_processes({name: sums[name].div_(ctx.batches_used) for name in ctx.layers})


def _device(ctx: SalienceContext, name: str, like: torch.Tensor) -> torch.device:
    return ctx.device if ctx.device is not None else like.device


def gradient(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """|ḡ| — the paper's best measure."""
    return {name: ctx.score_tensor(g.abs_(), ctx.layers[name]) for name, g in mean_gradients(ctx).items()}


def _weighted(ctx: SalienceContext, transform: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """transform(W ⊙ ḡ) per target, computed in the gradient's buffer (no second score-sized tensor per layer)."""
    return {name: ctx.score_tensor(transform(g.mul_(ctx.weight(name).to(g.device))), ctx.layers[name])
            for name, g in mean_gradients(ctx).items()}


def snip(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """|W ⊙ ḡ| (SNIP)."""
    return _weighted(ctx, torch.Tensor.abs_)


def taylor(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """(W ⊙ ḡ)² (first-order Taylor)."""
    return _weighted(ctx, torch.Tensor.square_)


def skeleton(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """−W ⊙ ḡ (skeletonization)."""
    return _weighted(ctx, torch.Tensor.neg_)


def grasp(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """(H ḡ) ⊙ W (GraSP, as the reference code ranks it: its top-k is the paper's lowest −(Hg)⊙θ)."""
    products = hessian_gradient_products(ctx, mean_gradients(ctx))
    return {name: ctx.score_tensor(hg * ctx.weight(name).to(hg.device), ctx.layers[name])
            for name, hg in products.items()}


FORCE_ROUNDS = 5


@contextlib.contextmanager
def _kept_only(ctx: SalienceContext, kept: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block every target computes with W ⊙ kept (output −= x·(W ⊙ ¬kept)ᵀ), the base left untouched."""

    def removal(name: str) -> Callable:
        weight = ctx.weight(name)
        return _adding(-weight.masked_fill(kept[name].to(weight.device), 0.0))

    with forward_hooks((module, removal(name)) for name, module in ctx.layers.items()):
        yield


def force(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """FORCE (progressive skeletonisation): `FORCE_ROUNDS` rounds of SNIP at the network masked to the previous
    round's keep-set, |W ⊙ ∂L/∂(W ⊙ c)|, the kept count shrinking geometrically from all weights to the budget (pruned
    weights may come back). Returns the last round's scores, whose top-`budget` is FORCE's selection. The rounds
    prune by a plain global ranking, as the method does; the one-entry-per-layer rule applies to the final mask."""
    if ctx.budget is None:
        raise ValueError("The force measure needs the trainable budget (SalienceContext.budget / compute_salience("
                         "budget=...)).")
    total = sum(ctx.shape(name)[0] * ctx.shape(name)[1] for name in ctx.layers)
    kept = {name: torch.ones(ctx.shape(name), dtype=torch.bool) for name in ctx.layers}
    for round_number in range(1, FORCE_ROUNDS + 1):
        with _kept_only(ctx, kept):
            scores = {name: (ctx.weight(name).to(g.device) * g).abs() for name, g in mean_gradients(ctx).items()}
        if round_number < FORCE_ROUNDS:
            count = max(ctx.budget, round(total * (ctx.budget / total) ** (round_number / FORCE_ROUNDS)))
            for name, indices in top_k_of_all(scores, count).items():
                kept[name] = torch.zeros(ctx.shape(name), dtype=torch.bool)
                kept[name].view(-1)[indices.cpu()] = True
    return {name: ctx.score_tensor(value, ctx.layers[name]) for name, value in scores.items()}


def fisher(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal: mean over samples of g_i²."""
    return {
        name: ctx.score_tensor(value, ctx.layers[name])
        for name, value in mean_squared_sample_gradients(ctx).items()
    }
