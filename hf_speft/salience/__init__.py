"""Salience: score every targeted weight with a registered measure (`compute_salience`, `score_layers`).

This package only scores; choosing and installing masks from the scores is `hf_speft.masks`'. It reads SPEFT layers
through their public surface (`effective_weight`, `calibrated_active_adapters`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from ..config import SparsePeftConfig
from ..integrations.deepspeed import gathered
from ..layer import SUPPORTED_LAYERS, sparse_layers
from ..measures import available_measures, get_measure, register_salience
from .context import SalienceContext, logical_weight
from .distributed import averaged_across_processes

logger = logging.getLogger(__name__)


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


def score_layers(measure: str, ctx: SalienceContext) -> dict[str, torch.Tensor]:
    """Run one registered measure over `ctx.layers`: checked scores, identical on every process (a measure that does
    not reduce across ranks itself is averaged once here)."""
    if not ctx.layers:
        raise ValueError("No targeted module to score: check target_modules (or the adapter name).")
    spec = get_measure(measure)
    if not spec.data_free and ctx.dataloader is None:
        raise ValueError(f"Salience measure {measure!r} needs data; pass a dataloader yielding batches with labels.")
    start = time.perf_counter()
    # Under ZeRO-3 a measure that runs the model sees its full weights, gathered once for the pass; the others read
    # one gathered layer at a time through `ctx.weight`.
    with gathered(ctx.model.parameters() if spec.runs_model and ctx.model is not None else []):
        scores = _checked_scores(measure, spec.fn(ctx), ctx)
    if not spec.reduces_across_ranks:
        scores = averaged_across_processes(scores)
    logger.info("salience %r over %d modules took %.2fs", measure, len(ctx.layers), time.perf_counter() - start)
    return scores


def compute_salience(
    model: nn.Module,
    dataloader: Optional[Iterable[Any]] = None,
    measure: str = "gradient",
    num_batches: int = 64,
    *,
    target_modules: Optional[list[str] | str] = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    device: Optional[str | torch.device] = None,
    seed: int = 0,
    show_progress: bool = True,
    budget: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Score every targeted weight: module name -> (out_features, in_features) scores.

    `model` is a `PeftModel` with a SPEFT adapter (its layers are scored, the current delta included in W) or a
    base model together with `target_modules` (matched like peft's `target_modules`). `dataloader` yields batches
    the model accepts, with labels; at most `num_batches` are read (a shorter one is used as it is, not cycled).
    `budget` (the number of weights to be kept) is needed by measures that prune progressively (`force`); for a SPEFT
    model it defaults to its adapter's.
    `dtype`/`device` set where the scores accumulate; `micro_batch_size` back-propagates each batch in micro-batches
    of that many rows (same scores, a micro-batch's activations).
    """
    if target_modules is None:
        layers = sparse_layers(model, adapter_name)
        if not layers:
            raise TypeError(
                f"Expected a PeftModel with a SPEFT adapter {adapter_name!r} (from get_peft_model(model, "
                f"SparsePeftConfig(...))), or a base model with target_modules=...; got {type(model).__name__}."
            )
        tuner = getattr(model, "base_model", model)
        if budget is None and hasattr(tuner, "adapter_budget"):
            budget = tuner.adapter_budget(adapter_name)
    else:
        layers = _matched_targets(model, target_modules)
    ctx = SalienceContext(layers=layers, model=model, dataloader=dataloader, num_batches=num_batches, dtype=dtype,
                          device=torch.device(device) if device is not None else None, seed=seed,
                          show_progress=show_progress, budget=budget, micro_batch_size=micro_batch_size)
    return score_layers(measure, ctx)


def _matched_targets(model: nn.Module, target_modules: list[str] | str) -> dict[str, nn.Module]:
    """Supported layers of a base model that peft's target-module matching selects."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = SparsePeftConfig(target_modules=target_modules, density=1.0, salience="magnitude")
    return {name: module for name, module in model.named_modules()
            if isinstance(module, SUPPORTED_LAYERS) and check_target_module_exists(config, name)}


__all__ = [
    "SalienceContext",
    "available_measures",
    "compute_salience",
    "get_measure",
    "logical_weight",
    "register_salience",
    "score_layers",
]
