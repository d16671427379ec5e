"""Salience: score every targeted weight, then build the masks (`compute_salience`, `calibrate`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from . import data_free, gradients
from .context import SalienceContext, logical_weight
from .registry import available_measures, get_measure, register_salience

logger = logging.getLogger(__name__)

for _name, _fn, _data_free in (
    ("magnitude", data_free.magnitude, True),
    ("random", data_free.random, True),
    ("gradient", gradients.gradient, False),
    ("snip", gradients.snip, False),
    ("taylor", gradients.taylor, False),
    ("skeleton", gradients.skeleton, False),
    ("fisher", gradients.fisher, False),
):
    register_salience(_name, _fn, data_free=_data_free, overwrite=True)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _checked_scores(measure: str, scores: dict[str, torch.Tensor], ctx: SalienceContext) -> dict[str, torch.Tensor]:
    if set(scores) != set(ctx.layers):
        raise ValueError(
            f"Salience measure {measure!r} must return scores for exactly {sorted(ctx.layers)}; got {sorted(scores)}."
        )
    for name in ctx.layers:
        if tuple(scores[name].shape) != ctx.shape(name):
            raise ValueError(
                f"Salience measure {measure!r} returned shape {tuple(scores[name].shape)} for {name!r}; "
                f"expected (out_features, in_features) = {ctx.shape(name)}."
            )
    return {name: scores[name] for name in ctx.layers}


def _run_measure(measure: str, ctx: SalienceContext) -> dict[str, torch.Tensor]:
    if not ctx.layers:
        raise ValueError("No targeted module to score: check target_modules (or the adapter name).")
    spec = get_measure(measure)
    if not spec.data_free and ctx.dataloader is None:
        raise ValueError(f"Salience measure {measure!r} needs data; pass a dataloader yielding batches with labels.")
    start = time.perf_counter()
    scores = _checked_scores(measure, spec.fn(ctx), ctx)
    logger.info("salience %r over %d modules took %.2fs", measure, len(ctx.layers), time.perf_counter() - start)
    return scores


def _adapter_context(peft_model: nn.Module, adapter_name: str, **kwargs: Any) -> SalienceContext:
    from ..model import sparse_layers, speft_tuner

    tuner = speft_tuner(peft_model)
    config = tuner.peft_config[adapter_name]
    return SalienceContext(
        layers=sparse_layers(tuner.model, adapter_name),
        model=peft_model,
        num_batches=config.salience_batches,
        dtype=_DTYPES[config.salience_dtype],
        device=torch.device(config.salience_device) if config.salience_device else None,
        seed=config.seed,
        **kwargs,
    )


def compute_adapter_salience(
    peft_model: nn.Module, adapter_name: str, dataloader: Optional[Iterable[Any]] = None
) -> dict[str, torch.Tensor]:
    """Scores of the configured measure for every SPEFT layer of `adapter_name`, keyed like `sparse_layers`."""
    ctx = _adapter_context(peft_model, adapter_name, dataloader=dataloader)
    return _run_measure(peft_model.peft_config[adapter_name].salience, ctx)


__all__ = [
    "SalienceContext",
    "available_measures",
    "compute_adapter_salience",
    "get_measure",
    "logical_weight",
    "register_salience",
]
