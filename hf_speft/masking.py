"""Top-k mask selection over per-layer salience scores: global or local, exact count, deterministic ties.

Ties are broken by position: among equal scores, the layer that comes first (in the order of the scores dict) and
then the lower flat index wins. NaN scores rank below every number. The global threshold is found from per-layer
top-k candidates merged into one running buffer of at most 2k values, so all scores are never concatenated.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _flat_scores(scores: torch.Tensor) -> torch.Tensor:
    flat = scores.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.float()
    return torch.nan_to_num(flat, nan=float("-inf"))


def _kth_largest(scores: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
    """The k-th largest score over all layers, keeping at most 2k candidates in memory at a time."""
    running = None
    for layer_scores in scores.values():
        flat = _flat_scores(layer_scores).float()
        candidates = flat.topk(min(k, flat.numel()), sorted=False).values.cpu()
        running = candidates if running is None else torch.cat([running, candidates])
        if running.numel() > k:
            running = running.topk(k, sorted=False).values
    return running.min()


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


def select_mask(scores: Mapping[str, torch.Tensor], budget: int, scope: str = "global") -> dict[str, torch.Tensor]:
    """Sorted flat int64 indices of the `budget` highest scores per layer, ranked globally or per layer."""
    sizes = {name: value.numel() for name, value in scores.items()}
    total = sum(sizes.values())
    if not 0 < budget <= total:
        raise ValueError(f"budget={budget} is not allowed for {total} scored weights; it must satisfy 0 < k <= {total}.")
    if scope == "local":
        return select_per_layer(scores, local_budgets(sizes, budget))
    if scope != "global":
        raise ValueError(f"scope={scope!r} is not allowed; use 'global' or 'local'.")
    threshold = _kth_largest(scores, budget)
    num_above = sum(int((_flat_scores(value) > threshold.to(value.device)).sum()) for value in scores.values())
    tie_quota = budget - num_above
    masks = {}
    for name, value in scores.items():
        masks[name], taken = _top_count(_flat_scores(value), threshold, tie_quota)
        tie_quota -= taken
    return masks
