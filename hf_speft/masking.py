"""Top-k mask selection over per-layer salience scores: global or local, exact count, deterministic ties.

Ties are broken by position: among equal scores, the layer that comes first (in the order of the scores dict) and
then the lower flat index wins. NaN scores rank below every number. `MaskSelector` takes the scores a group of
layers at a time: a global ranking keeps only a running buffer of at most 2k candidates (score, layer, index), so
all scores are never concatenated, nor need they all exist at once.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    threshold = flat.topk(k, sorted=False).values.min()
    num_above = int((flat > threshold).sum())
    indices, _ = _top_count(flat, threshold, k - num_above)
    return indices


def local_budgets(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Split `total` in proportion to the layer sizes (same density everywhere), largest remainder rounding."""
    numel = sum(sizes.values())
    exact = {name: total * size / numel for name, size in sizes.items()}
    budgets = {name: int(value) for name, value in exact.items()}
    order = {name: position for position, name in enumerate(sizes)}
    by_remainder = sorted(sizes, key=lambda name: (budgets[name] - exact[name], order[name]))
    for name in by_remainder[: total - sum(budgets.values())]:
        budgets[name] += 1
    return budgets


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
    `budget` entries whenever it passes 2·`budget`; local scope selects each layer's fixed share as it arrives.
    """

    def __init__(self, sizes: Mapping[str, int], budget: int, scope: str = "global") -> None:
        total = sum(sizes.values())
        if not 0 < budget <= total:
            raise ValueError(f"budget={budget} is not allowed for {total} scored weights; it must satisfy 0 < k <= "
                             f"{total}.")
        if scope not in ("global", "local"):
            raise ValueError(f"scope={scope!r} is not allowed; use 'global' or 'local'.")
        self.sizes, self.budget, self.scope = dict(sizes), budget, scope
        self._counts = local_budgets(sizes, budget) if scope == "local" else None
        self._pending = list(sizes)
        self._local: dict[str, torch.Tensor] = {}
        self._values = torch.zeros(0)
        self._positions = torch.zeros(0, dtype=torch.int64)
        self._indices = torch.zeros(0, dtype=torch.int64)

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
            top = _select_topk(flat, min(self.budget, flat.numel()))
            position = len(self.sizes) - len(self._pending) - 1
            self._values = torch.cat([self._values, flat[top].float().cpu()])
            self._positions = torch.cat([self._positions, torch.full((top.numel(),), position)])
            self._indices = torch.cat([self._indices, top.cpu()])
            if self._values.numel() > 2 * self.budget:
                self._keep(self._top_candidates())

    def _top_candidates(self) -> torch.Tensor:
        """Which buffered candidates are the `budget` best: above the k-th largest, then its ties in buffer order
        (= layer order, then index)."""
        threshold = self._values.topk(self.budget, sorted=False).values.min()
        kept = self._values > threshold
        ties = torch.nonzero(self._values == threshold).flatten()[: self.budget - int(kept.sum())]
        kept[ties] = True
        return kept

    def _keep(self, kept: torch.Tensor) -> None:
        self._values, self._positions, self._indices = (self._values[kept], self._positions[kept],
                                                        self._indices[kept])

    def masks(self) -> dict[str, torch.Tensor]:
        """Sorted flat int64 indices of the selected entries of every layer."""
        if self._pending:
            raise ValueError(f"No scores were added for {self._pending}.")
        if self._counts is not None:
            return dict(self._local)
        self._keep(self._top_candidates())
        return {name: self._indices[self._positions == position] for position, name in enumerate(self.sizes)}


def select_mask(scores: Mapping[str, torch.Tensor], budget: int, scope: str = "global") -> dict[str, torch.Tensor]:
    """Sorted flat int64 indices of the `budget` highest scores per layer, ranked globally or per layer."""
    selector = MaskSelector({name: value.numel() for name, value in scores.items()}, budget, scope)
    selector.add(scores)
    return selector.masks()
