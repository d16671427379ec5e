"""Composing sparse deltas exactly: weighted sums and peft's TIES / DARE / magnitude-prune merges, entry by entry.

The sum of sparse deltas is a sparse delta on the union of their masks, so composition needs no SVD and no
approximation: each module's deltas are laid side by side on the union of their indices (an adapter contributes 0
where it has no entry), and peft's merge arithmetic (`peft.utils.merge_utils`) runs on those vectors. Entries outside
the union are 0 in every adapter and stay 0, so the result equals the same arithmetic on the dense deltas.

`density` keeps that fraction of each adapter's own entries (its trained weights), by magnitude (`ties`,
`magnitude_prune`) or at random with rescaling (`dare_*`): peft's meaning of density, applied to what a sparse
adapter trained rather than to all out×in weights, which are mostly exact zeros.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, magnitude_based_pruning

if TYPE_CHECKING:
    from .config import SparsePeftConfig

COMBINATION_TYPES = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN_METHODS = ("total", "frequency")
_PRUNED = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random", "dare_ties": "random"}

Entries = tuple[torch.Tensor, torch.Tensor]  # (int64 flat indices, float values) of one module's delta


def check_combination(count: int, weights: Sequence[float], combination_type: str, density: Optional[float],
                      majority_sign_method: str) -> None:
    """A one-line ValueError for any bad composition argument, before any work."""
    if count < 1:
        raise ValueError("Give at least one adapter to compose.")
    if len(weights) != count:
        raise ValueError(f"Got {len(weights)} weights for {count} adapters; give one weight per adapter.")
    if not all(isinstance(weight, (int, float)) and not isinstance(weight, bool) for weight in weights):
        raise ValueError(f"weights={list(weights)!r} must be numbers.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not allowed; use one of {COMBINATION_TYPES}.")
    if combination_type in _PRUNED:
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
            raise ValueError(f"combination_type={combination_type!r} needs a density with 0 < density <= 1 (the "
                             f"fraction of each adapter's entries kept); got {density!r}.")
    elif density is not None:
        raise ValueError(f"density applies to {tuple(_PRUNED)}, not to combination_type={combination_type!r}.")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method={majority_sign_method!r} is not allowed; use one of "
                         f"{MAJORITY_SIGN_METHODS}.")


def _sorted(indices: torch.Tensor, values: torch.Tensor) -> Entries:
    order = torch.argsort(indices)
    return indices[order].to(torch.int64), values[order].float()


def compose_entries(deltas: Sequence[Entries], weights: Sequence[float], combination_type: str = "linear",
                    density: Optional[float] = None, majority_sign_method: str = "total",
                    generator: Optional[torch.Generator] = None) -> Entries:
    """One module's composed delta: (sorted union of the adapters' indices, float32 values on it).

    `linear` and `cat` are the weighted sum (`cat` concatenates LoRA ranks in peft; for sparse deltas the exact
    equivalent is the same sum); `magnitude_prune` and `dare_linear` prune each adapter first; `ties` and `dare_ties`
    prune, then keep per entry only the adapters agreeing with the majority sign and average them, as peft does.
    `generator` draws DARE's keep-masks (one draw per entry of each adapter, in index order).
    """
    deltas = [_sorted(indices, values) for indices, values in deltas]
    union = torch.unique(torch.cat([indices for indices, _ in deltas]))
    pruning = _PRUNED.get(combination_type)
    stacked = torch.zeros(len(deltas), union.numel())
    for row, (indices, values) in enumerate(deltas):
        if pruning == "magnitude":
            values = magnitude_based_pruning(values, density)
        elif pruning == "random":
            keep = torch.rand(values.shape, generator=generator) < density
            values = values * keep / density
        stacked[row, torch.searchsorted(union, indices)] = values
    weights = torch.tensor([float(weight) for weight in weights]).view(-1, 1)
    if combination_type in ("ties", "dare_ties"):
        return union, disjoint_merge(stacked * weights, calculate_majority_sign_mask(stacked, majority_sign_method))
    return union, (stacked * weights).sum(dim=0)


def keep_largest(deltas: dict[str, Entries], budget: int) -> dict[str, Entries]:
    """The `budget` entries of largest |value| across all modules, at least one per module (each module's largest
    first, as calibrated masks keep one entry per layer); indices stay sorted."""
    if not isinstance(budget, int) or isinstance(budget, bool) or not len(deltas) <= budget:
        raise ValueError(f"budget={budget!r} must be an integer of at least the number of modules ({len(deltas)}): "
                         "every module keeps one entry.")
    names = list(deltas)
    magnitudes = [deltas[name][1].abs() for name in names]
    owner = torch.cat([torch.full((m.numel(),), i) for i, m in enumerate(magnitudes)])
    flat = torch.cat(magnitudes)
    starts = torch.tensor([0] + [m.numel() for m in magnitudes]).cumsum(0)[:-1]
    reserved = starts + torch.stack([m.argmax() for m in magnitudes])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[reserved] = True
    rest = budget - len(names)
    if rest > 0:
        candidates = flat.masked_fill(chosen, -1.0)
        chosen[torch.topk(candidates, min(rest, int((~chosen).sum()))).indices] = True
    kept = {}
    for i, name in enumerate(names):
        mine = chosen[owner == i]
        kept[name] = (deltas[name][0][mine], deltas[name][1][mine])
    return kept


def compose_modules(deltas: dict[str, Sequence[Entries]], weights: Sequence[float], combination_type: str = "linear",
                    density: Optional[float] = None, majority_sign_method: str = "total",
                    budget: Optional[int] = None, seed: int = 0) -> dict[str, Entries]:
    """Module name -> its composed delta, for module name -> the adapters' deltas (in adapter order). Modules are
    composed in sorted name order with one generator seeded by `seed`, so a model and its saved folders compose alike;
    `budget` then keeps the largest entries (`keep_largest`)."""
    generator = torch.Generator().manual_seed(seed)
    composed = {name: compose_entries(deltas[name], weights, combination_type, density, majority_sign_method,
                                      generator) for name in sorted(deltas)}
    return composed if budget is None else keep_largest(composed, budget)


def composed_config(config: SparsePeftConfig, composed: dict[str, Entries]) -> SparsePeftConfig:
    """A copy of the first adapter's `config` that describes the composed adapter: its budget is exactly its entries,
    its mask static, and its masks come with it (no salience runs when it is injected)."""
    config = copy.deepcopy(config)
    config.density = config.match_lora_rank = None
    config.num_params = sum(indices.numel() for indices, _ in composed.values())
    config.mask_update = "static"
    config.saved_masks = True
    return config

