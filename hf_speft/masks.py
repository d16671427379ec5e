"""The masks of SPEFT adapters: each adapter's budget, calibrate → select → install, and dynamic updates.

Scores come from `hf_speft.salience`, top-k selection from `hf_speft.masking`; this module decides which layers and
budget they apply to and writes the result into the layers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn

from .config import SparsePeftConfig
from .layer import SparsePeftLayer, sparse_layers
from .masking import MaskSelector, select_per_layer
from .measures import get_measure
from .salience import SalienceContext, score_layers

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SparseMasks:
    """The mask operations of a tuner holding SPEFT adapters (`SparsePeftModel`, and peft's mixed model with SPEFT
    adapters beside other kinds): budgets, installing calibrated masks, dynamic updates. Needs `model` and
    `peft_config`."""

    def check_injectable(self, adapter_name: str) -> None:
        """Before an injection changes the model: the measure that will build the adapter's masks is registered
        (`SparsePeftConfig.check_salience`); a config with `saved_masks` needs none."""
        config = self.peft_config[adapter_name]
        if not config.saved_masks:
            config.check_salience()

    def build_data_free_masks(self, adapter_name: str) -> None:
        """Build the adapter's mask right away when its configured salience measure needs no data, unless its config
        has `saved_masks` (a saved or composed adapter, whose masks come with it: no salience work)."""
        config = self.peft_config[adapter_name]
        if config.saved_masks:
            return
        if get_measure(config.salience).data_free:
            self.install_masks(adapter_name, select_adapter_masks(self, adapter_name))

    def adapter_budget(self, adapter_name: str) -> int:
        """The number of weights the adapter's mask trains across its SPEFT layers (its configured budget, less the
        low-rank part of hybrid mode)."""
        layers = sparse_layers(self.model, adapter_name)
        shapes = [(layer.out_features, layer.in_features) for layer in layers.values()]
        return self.peft_config[adapter_name].budget_split(shapes)[0]

    def install_masks(self, adapter_name: str, masks: dict[str, torch.Tensor]) -> dict[str, int]:
        """Give every SPEFT layer of the adapter its mask (sorted flat indices, keyed like `sparse_layers`)."""
        config: SparsePeftConfig = self.peft_config[adapter_name]
        layers = self._scored_layers(adapter_name, masks)
        generator = torch.Generator().manual_seed(config.seed)
        for name, layer in layers.items():
            layer.set_mask(adapter_name, masks[name], init_weights=config.init_weights, generator=generator)
        return {name: int(mask.numel()) for name, mask in masks.items()}

    def update_masks(self, adapter_name: str, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dynamic mask update: re-rank the entries of every layer in `scores` (all or some of the adapter's SPEFT
        layers), keeping each layer's count.

        The model's function is unchanged (see `SparsePeftLayer.update_mask`). Counts stay fixed so parameter shapes,
        optimizer state and DDP buckets keep their layout. Returns, per layer, each new entry's old position or -1.
        """
        layers = sparse_layers(self.model, adapter_name)
        unknown = sorted(set(scores) - set(layers))
        if unknown:
            raise ValueError(f"Scores for {unknown}, which are not SPEFT layers of adapter {adapter_name!r}.")
        layers = {name: layers[name] for name in scores}
        for layer in layers.values():
            layer.check_calibrated(adapter_name)
        counts = {name: layer.speft_values[adapter_name].numel() for name, layer in layers.items()}
        masks = select_per_layer({name: scores[name] for name in layers}, counts)
        return {name: layer.update_mask(adapter_name, masks[name]) for name, layer in layers.items()}

    def _scored_layers(self, adapter_name: str, scores: dict[str, torch.Tensor]) -> dict[str, SparsePeftLayer]:
        layers = sparse_layers(self.model, adapter_name)
        if set(scores) != set(layers):
            missing, extra = sorted(set(layers) - set(scores)), sorted(set(scores) - set(layers))
            raise ValueError(f"Scores must cover exactly the SPEFT layers; missing {missing}, unexpected {extra}.")
        return layers


def speft_tuner(model: nn.Module) -> SparseMasks:
    """The tuner holding the SPEFT adapters of a `PeftModel` or `PeftMixedModel` (or the tuner itself); a clear error
    for anything else."""
    from peft import PeftMixedModel, PeftModel

    tuner = model.base_model if isinstance(model, (PeftModel, PeftMixedModel)) else model
    if not isinstance(tuner, SparseMasks):
        raise TypeError(
            f"Expected a PeftModel with a SPEFT adapter (from get_peft_model(model, SparsePeftConfig(...))), got "
            f"{type(model).__name__}."
        )
    return tuner


def adapter_salience_groups(
    peft_model: nn.Module, adapter_name: str, dataloader: Optional[Iterable[Any]] = None, show_progress: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """The configured measure's scores of the adapter's SPEFT layers, one group of consecutive layers at a time
    (`salience_groups` groups), so only one group's scores exist at once. With several groups the data batches are
    read once and every group is scored on the same ones."""
    tuner = speft_tuner(peft_model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"No SPEFT adapter named {adapter_name!r}; the model has {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]
    config.check_salience()
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
        yield score_layers(config.salience, ctx)
        return
    if not get_measure(config.salience).data_free:
        ctx = dataclasses.replace(ctx, dataloader=list(ctx.batches("salience (reading batches)")))
    names = list(ctx.layers)
    for group in range(groups):
        part = names[len(names) * group // groups: len(names) * (group + 1) // groups]
        yield score_layers(config.salience, dataclasses.replace(ctx, layers={name: ctx.layers[name] for name in part}))


def select_adapter_masks(
    peft_model: nn.Module, adapter_name: str, dataloader: Optional[Iterable[Any]] = None, show_progress: bool = True
) -> dict[str, torch.Tensor]:
    """The adapter's masks for its configured measure, budget and scope (flat indices per SPEFT layer)."""
    tuner = speft_tuner(peft_model)
    sizes = {name: layer.out_features * layer.in_features
             for name, layer in sparse_layers(tuner.model, adapter_name).items()}
    selector = MaskSelector(sizes, tuner.adapter_budget(adapter_name), tuner.peft_config[adapter_name].mask_scope)
    for scores in adapter_salience_groups(peft_model, adapter_name, dataloader, show_progress):
        selector.add(scores)
        del scores
    return selector.masks()


def calibrate(
    peft_model: nn.Module,
    dataloader: Optional[Iterable[Any]] = None,
    adapter_name: Optional[str] = None,
    show_progress: bool = True,
) -> dict[str, int]:
    """Compute the adapter's configured salience, build its masks and fill the layers; returns nnz per module.

    Logs the salience time and the density of every layer.
    """
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
