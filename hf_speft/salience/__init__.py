"""Salience: score every targeted weight, then build the masks (`compute_salience`, `calibrate`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn

from . import data_free, gradients, synflow
from .context import SalienceContext, logical_weight
from .distributed import averaged_across_processes
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
    ("grasp", gradients.grasp, False),
    ("force", gradients.force, False),
    ("synflow", synflow.synflow, True),
):
    register_salience(_name, _fn, data_free=_data_free, overwrite=True)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PER_WEIGHT_MEASURES = ("magnitude", "random")  # they read weights only, never run the model


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
    with _model_gathered(measure, ctx):
        scores = _checked_scores(measure, spec.fn(ctx), ctx)
    if not spec.data_free:  # built-ins already reduce their raw statistics; this keeps any measure rank-identical
        scores = averaged_across_processes(scores)
    logger.info("salience %r over %d modules took %.2fs", measure, len(ctx.layers), time.perf_counter() - start)
    return scores


def _model_gathered(measure: str, ctx: SalienceContext):
    """Under ZeRO-3, measures that run the model see its full weights (gathered once for the salience pass); the
    per-weight measures read one gathered layer at a time through `ctx.weight`."""
    from ..integrations.deepspeed import gathered

    if measure in PER_WEIGHT_MEASURES or ctx.model is None:
        return gathered([])
    return gathered(ctx.model.parameters())


def adapter_salience_groups(
    peft_model: nn.Module, adapter_name: str, dataloader: Optional[Iterable[Any]] = None, show_progress: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """The configured measure's scores of the adapter's SPEFT layers, one group of consecutive layers at a time
    (`salience_groups` groups), so only one group's scores exist at once. With several groups the data batches are
    read once and every group is scored on the same ones."""
    from ..model import sparse_layers, speft_tuner

    tuner = speft_tuner(peft_model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"No SPEFT adapter named {adapter_name!r}; the model has {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]
    ctx = SalienceContext(
        layers=sparse_layers(tuner.model, adapter_name),
        budget=tuner.adapter_budget(adapter_name),
        model=peft_model,
        dataloader=dataloader,
        num_batches=config.salience_batches,
        dtype=_DTYPES[config.salience_dtype],
        device=torch.device(config.salience_device) if config.salience_device else None,
        seed=config.seed,
        show_progress=show_progress,
        micro_batch_size=config.salience_micro_batch_size,
    )
    groups = min(config.salience_groups, max(len(ctx.layers), 1))
    if groups == 1:
        yield _run_measure(config.salience, ctx)
        return
    if not get_measure(config.salience).data_free:
        ctx = dataclasses.replace(ctx, dataloader=list(ctx.batches("salience (reading batches)")))
    names = list(ctx.layers)
    for group in range(groups):
        part = names[len(names) * group // groups: len(names) * (group + 1) // groups]
        yield _run_measure(config.salience, dataclasses.replace(ctx, layers={name: ctx.layers[name] for name in part}))


def select_adapter_masks(
    peft_model: nn.Module, adapter_name: str, dataloader: Optional[Iterable[Any]] = None, show_progress: bool = True
) -> dict[str, torch.Tensor]:
    """The adapter's masks for its configured measure, budget and scope (flat indices per SPEFT layer)."""
    from ..masking import MaskSelector
    from ..model import sparse_layers, speft_tuner

    tuner = speft_tuner(peft_model)
    sizes = {name: layer.out_features * layer.in_features
             for name, layer in sparse_layers(tuner.model, adapter_name).items()}
    selector = MaskSelector(sizes, tuner.adapter_budget(adapter_name), tuner.peft_config[adapter_name].mask_scope)
    for scores in adapter_salience_groups(peft_model, adapter_name, dataloader, show_progress):
        selector.add(scores)
        del scores
    return selector.masks()


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
    from ..model import sparse_layers, speft_tuner

    if target_modules is None:
        tuner = speft_tuner(model)
        layers = sparse_layers(tuner.model, adapter_name)
        if budget is None and adapter_name in tuner.peft_config:
            budget = tuner.adapter_budget(adapter_name)
    else:
        layers = _matched_targets(model, target_modules)
    ctx = SalienceContext(layers=layers, model=model, dataloader=dataloader, num_batches=num_batches, dtype=dtype,
                          device=torch.device(device) if device is not None else None, seed=seed,
                          show_progress=show_progress, budget=budget, micro_batch_size=micro_batch_size)
    return _run_measure(measure, ctx)


def _matched_targets(model: nn.Module, target_modules: list[str] | str) -> dict[str, nn.Module]:
    """Supported layers of a base model that peft's target-module matching selects."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from ..config import SparsePeftConfig
    from ..model import SUPPORTED_LAYERS

    config = SparsePeftConfig(target_modules=target_modules, density=1.0, salience="magnitude")
    return {name: module for name, module in model.named_modules()
            if isinstance(module, SUPPORTED_LAYERS) and check_target_module_exists(config, name)}


def calibrate(
    peft_model: nn.Module,
    dataloader: Optional[Iterable[Any]] = None,
    adapter_name: Optional[str] = None,
    show_progress: bool = True,
) -> dict[str, int]:
    """Compute the adapter's configured salience, build its masks and fill the layers; returns nnz per module.

    Logs the salience time and the density of every layer.
    """
    from ..model import sparse_layers, speft_tuner

    tuner = speft_tuner(peft_model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    start = time.perf_counter()
    counts = tuner.install_masks(adapter_name, select_adapter_masks(peft_model, adapter_name, dataloader,
                                                                    show_progress))
    layers = sparse_layers(tuner.model, adapter_name)
    logger.info("calibrated adapter %r in %.2fs (%d trainable weights)", adapter_name, time.perf_counter() - start,
                sum(counts.values()))
    for name, count in counts.items():
        layer = layers[name]
        logger.info("  %s: density %.5f (%d)", name, count / (layer.out_features * layer.in_features), count)
    return counts


__all__ = [
    "adapter_salience_groups",
    "calibrate",
    "compute_salience",
    "SalienceContext",
    "available_measures",
    "get_measure",
    "logical_weight",
    "register_salience",
    "select_adapter_masks",
]
