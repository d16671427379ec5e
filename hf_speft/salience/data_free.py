"""Salience measures that need no data: magnitude |W| and seeded uniform random."""

from __future__ import annotations

import torch

from .context import SalienceContext


def magnitude(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """|W| of the effective weight."""
    return {name: ctx.score_tensor(ctx.weight(name).abs(), layer) for name, layer in ctx.layers.items()}


def random(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """Uniform random scores from one generator seeded with `seed`, layer after layer."""
    generator = ctx.generator()
    scores = {}
    for name, layer in ctx.layers.items():
        scores[name] = ctx.score_tensor(torch.rand(ctx.shape(name), generator=generator), layer)
    return scores
