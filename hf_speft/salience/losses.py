"""The loss of a salience batch, whole or as micro-batch terms whose gradients sum to the whole batch's.

Micro-batches bound the activation memory of a salience pass by `micro_batch_size` rows instead of the dataloader's
batch size. Each term is its micro-batch's mean loss times the micro-batch's share of the batch's loss items, so the
terms add up to the batch's mean loss exactly: the items are label tokens for token-level labels (`-100` ignored and,
for causal LMs, the first position of every row too, which their loss shifts away — the rule `transformers.Trainer`
counts `num_items_in_batch` by) and rows for per-example labels (classification, regression). Whether a model's loss
shifts is `compat.loss_shifts_labels`, which refuses a loss it does not know rather than weight micro-batches wrongly;
batches that carry `shift_labels` need no such lookup.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn

from ..integrations.compat import loss_shifts_labels

IGNORE_INDEX = -100


def batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The mean loss the model returns for a batch; a clear error if the batch carries no labels."""
    outputs = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"The model returned no loss for a salience batch with keys {keys}; data-dependent salience needs "
            "batches with `labels` (e.g. from DataCollatorForLanguageModeling or a labelled classification set)."
        )
    return loss


def batch_rows(batch: Any) -> int:
    """Number of examples in a batch (the first dimension of its labels, else of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() > 0:
        return labels.shape[0]
    tensors = [value for value in batch.values() if isinstance(value, torch.Tensor) and value.dim() > 0]
    if not tensors:
        raise ValueError(f"A salience batch needs tensors with a batch dimension; got keys {sorted(batch)}.")
    return tensors[0].shape[0]


def loss_terms(model: nn.Module, batch: Any, micro_batch_size: Optional[int] = None) -> Iterator[torch.Tensor]:
    """The batch's mean loss as terms to back-propagate one at a time (their gradients sum to the batch's).

    Without `micro_batch_size` (or when the batch is no larger) the single term is the model's loss on the batch.
    Micro-batches without any loss item are skipped (they contribute no gradient).
    """
    rows = batch_rows(batch)
    if micro_batch_size is None or micro_batch_size >= rows:
        yield batch_loss(model, batch)
        return
    items = _loss_items_per_row(model, batch, rows)
    total = items.sum()
    for start in range(0, rows, micro_batch_size):
        share = items[start:start + micro_batch_size].sum() / total
        if share > 0:
            yield batch_loss(model, _rows(batch, rows, start, start + micro_batch_size)) * share


def _rows(batch: Any, rows: int, start: int, stop: int) -> Any:
    """The batch restricted to rows [start, stop): every tensor whose first dimension is the batch's is sliced."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    return {key: value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
            else value for key, value in batch.items()}


def _loss_items_per_row(model: nn.Module, batch: Any, rows: int) -> torch.Tensor:
    """How many loss items each row holds: its counted label tokens, or 1 for per-example labels."""
    labels = batch.get("shift_labels") if isinstance(batch, Mapping) else None
    if labels is None:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and _is_token_level(labels) and loss_shifts_labels(model):
            labels = labels[..., 1:]
    if not isinstance(labels, torch.Tensor) or not _is_token_level(labels):
        return torch.ones(rows, dtype=torch.float64)
    return labels.ne(IGNORE_INDEX).reshape(rows, -1).sum(dim=1).double().cpu()


def _is_token_level(labels: torch.Tensor) -> bool:
    """Integer labels with more than one dimension: one class index per token (multi-label targets are floats)."""
    return labels.dim() > 1 and not labels.is_floating_point()
