"""Top-k mask selection over per-layer salience scores: global or local, exact count, deterministic ties.

Every scored layer gets at least one entry, in both scopes, so no SPEFT layer holds an empty (0-element) trainable
parameter: local scope gives each layer one entry and splits the rest of the budget by layer size; global scope keeps
each layer's highest-scored entry and ranks the rest of the budget across all layers. A budget below the number of
layers is refused.

Ties are broken by position: among equal scores, the layer that comes first (in the order of the scores dict) and
then the lower flat index wins. NaN scores rank below every number. `MaskSelector` takes the scores a group of
layers at a time: a global ranking keeps only a running buffer of at most 2k candidates (score, layer, index), so
all scores are never concatenated, nor need they all exist at once. Once the buffer has been pruned to k, its k-th
best score is a floor: no later entry at or below it can still be chosen (ties go to the earlier layer), so later
layers add only the entries above it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch


def _flat_scores(scores: torch.Tensor) -> torch.Tensor:
    flat = scores.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.float()
    return torch.nan_to_num(flat, nan=float("-inf"))


def _top_count(flat: torch.Tensor, threshold: torch.Tensor, tie_quota: int) -> tuple[torch.Tensor, int]:
    """Indices above `threshold` plus the first `tie_quota` indices equal to it (sorted); and the ties taken."""
    threshold = threshold.to(device=flat.device, dtype=flat.dtype)
    above = torch.nonzero(flat > threshold).flatten()
    ties = torch.nonzero(flat == threshold).flatten()[:tie_quota]
    return torch.cat([above, ties]).sort().values, ties.numel()


def _select_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest entries of one tensor, ties to the lower index."""
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=flat.device)
    if k == flat.numel():
        return torch.arange(k, device=flat.device)
    threshold = flat.topk(k, sorted=False).values.min()
    num_above = int((flat > threshold).sum())
    indices, _ = _top_count(flat, threshold, k - num_above)
    return indices


def check_budget(sizes: Mapping[str, int], budget: int) -> None:
    """Refuse a budget that cannot give every layer one entry, or asks for more entries than the layers hold."""
    total = sum(sizes.values())
    if not len(sizes) <= budget <= total:
        raise ValueError(
            f"budget={budget} is not allowed for {len(sizes)} layers of {total} weights: every targeted layer trains "
            f"at least one weight, so it must satisfy {len(sizes)} <= budget <= {total}."
        )


def local_budgets(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """One entry per layer, and the rest of `total` split in proportion to what each layer has left (size - 1, so the
    density is the same everywhere up to the one entry and no layer is given more than it holds), largest remainder
    rounding."""
    check_budget(sizes, total)
    left, rest = sum(sizes.values()) - len(sizes), total - len(sizes)
    exact = {name: 1 + (rest * (size - 1) / left if left else 0) for name, size in sizes.items()}
    budgets = {name: int(value) for name, value in exact.items()}
    order = {name: position for position, name in enumerate(sizes)}
    by_remainder = sorted(sizes, key=lambda name: (budgets[name] - exact[name], order[name]))
    for name in by_remainder[: total - sum(budgets.values())]:
        budgets[name] += 1
    return budgets


def top_k_of_all(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Sorted flat int64 indices per layer of the k highest scores of all layers ranked together, with no
    one-per-layer floor: for ranking weights (FORCE's pruning rounds), not for building a mask. Concatenates."""
    flats = [_flat_scores(value) for value in scores.values()]
    chosen = _select_topk(torch.cat([flat.cpu() for flat in flats]), k)
    result, start = {}, 0
    for name, flat in zip(scores, flats):
        end = start + flat.numel()
        result[name] = chosen[(chosen >= start) & (chosen < end)] - start
        start = end
    return result


def select_per_layer(scores: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Sorted flat int64 indices of the `counts[name]` highest scores of each layer."""
    for name, value in scores.items():
        if not 0 <= counts[name] <= value.numel():
            raise ValueError(f"count={counts[name]} is not allowed for {name!r} with {value.numel()} weights.")
    return {name: _select_topk(_flat_scores(value), counts[name]) for name, value in scores.items()}


class MaskSelector:
    """Select the `budget` highest scores over layers of the given `sizes`, fed a group of layers at a time, in the
    order of `sizes` (the tie order). `masks()` equals `select_mask` on all scores at once.

    Global scope keeps each added layer's top-`budget` entries in a running candidate buffer, pruned back to
    `budget` entries whenever it passes 2·`budget` (later layers then add only entries above the pruned buffer's
    lowest score); local scope selects each layer's fixed share as it arrives.
    """

    def __init__(self, sizes: Mapping[str, int], budget: int, scope: str = "global") -> None:
        check_budget(sizes, budget)
        if scope not in ("global", "local"):
            raise ValueError(f"scope={scope!r} is not allowed; use 'global' or 'local'.")
        self.sizes, self.budget, self.scope = dict(sizes), budget, scope
        self._counts = local_budgets(sizes, budget) if scope == "local" else None
        self._pending = list(sizes)
        self._local: dict[str, torch.Tensor] = {}
        self._reserved: dict[str, torch.Tensor] = {}
        self._ranked = budget - len(sizes)  # global scope: entries ranked across layers, beyond one per layer
        self._floor: Optional[torch.Tensor] = None  # the ranked-th best candidate score at the last prune
        # (scores, layers, indices) parts, concatenated only when pruned; the first part holds what a prune kept
        self._candidates = [(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))]

    def add(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Take the scores of the next layers (each of its layer's size)."""
        for name, value in scores.items():
            if not self._pending or name != self._pending[0]:
                expected = self._pending[0] if self._pending else "no more layers"
                raise ValueError(f"Scores for {name!r} arrived out of order; expected {expected!r}.")
            if value.numel() != self.sizes[name]:
                raise ValueError(f"Scores for {name!r} have {value.numel()} entries; expected {self.sizes[name]}.")
            self._pending.pop(0)
            flat = _flat_scores(value)
            if self._counts is not None:
                self._local[name] = _select_topk(flat, self._counts[name])
                continue
            # The layer's best entry is reserved; the next `ranked` best compete globally.
            best = _select_topk(flat, 1)
            top = self._layer_candidates(flat)
            top = top[top != best]
            self._reserved[name] = best.cpu()
            position = len(self.sizes) - len(self._pending) - 1
            self._candidates.append((flat[top].float().cpu(), torch.full((top.numel(),), position), top.cpu()))
            if sum(part[0].numel() for part in self._candidates) > 2 * self._ranked:
                self._prune()

    def _layer_candidates(self, flat: torch.Tensor) -> torch.Tensor:
        """Sorted indices of the layer's entries that can still be among the `ranked` best: its `ranked + 1` best
        (its reserved best included), above the floor once there is one."""
        if self._floor is None:
            return _select_topk(flat, min(self._ranked + 1, flat.numel()))
        above = torch.nonzero(flat.float() > self._floor.to(flat.device)).flatten()
        if above.numel() > self._ranked + 1:
            above = above[_select_topk(flat[above], self._ranked + 1)]
        return above

    def _prune(self) -> None:
        """Keep the `ranked` best candidates: above the k-th largest score, then its ties in buffer order (= layer
        order, then index); that score becomes the floor."""
        scores, layers, indices = (torch.cat(parts) for parts in zip(*self._candidates))
        if self._ranked == 0 or scores.numel() == 0:
            kept = torch.zeros(scores.numel(), dtype=torch.bool)
        else:
            threshold = scores.topk(min(self._ranked, scores.numel()), sorted=False).values.min()
            kept = scores > threshold
            ties = torch.nonzero(scores == threshold).flatten()[: self._ranked - int(kept.sum())]
            kept[ties] = True
            if scores.numel() >= self._ranked:
                self._floor = threshold
        self._candidates = [(scores[kept], layers[kept], indices[kept])]

    def masks(self) -> dict[str, torch.Tensor]:
        """Sorted flat int64 indices of the selected entries of every layer."""
        if self._pending:
            raise ValueError(f"No scores were added for {self._pending}.")
        if self._counts is not None:
            return dict(self._local)
        self._prune()
        _, layers, indices = self._candidates[0]
        order = torch.argsort(layers, stable=True)  # candidates grouped by layer, each group in index order
        groups = indices[order].split(torch.bincount(layers, minlength=len(self.sizes)).tolist())
        return {name: torch.cat([self._reserved[name], group]).sort().values
                for name, group in zip(self.sizes, groups)}


def select_mask(scores: Mapping[str, torch.Tensor], budget: int, scope: str = "global") -> dict[str, torch.Tensor]:
    """Sorted flat int64 indices of the `budget` highest scores per layer, ranked globally or per layer."""
    selector = MaskSelector({name: value.numel() for name, value in scores.items()}, budget, scope)
    selector.add(scores)
    return selector.masks()
