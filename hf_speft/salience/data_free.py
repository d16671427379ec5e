"""Salience measures that need no data: magnitude |W| and seeded uniform random."""

from __future__ import annotations

import zlib

import torch

from .context import SalienceContext


def magnitude(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """|W| of the effective weight."""
    return {name: ctx.score_tensor(ctx.weight(name).abs(), layer) for name, layer in ctx.layers.items()}


def random(ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """Uniform random scores, each layer's from a generator seeded with `seed` and the layer's name (so a layer's
    scores do not depend on which other layers are scored with it)."""
    scores = {}
    for name, layer in ctx.layers.items():
        generator = torch.Generator().manual_seed(ctx.seed * 2**32 + zlib.crc32(name.encode()))
        scores[name] = ctx.score_tensor(torch.rand(ctx.shape(name), generator=generator), layer)
    return scores
