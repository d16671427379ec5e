"""`SalienceContext`: what a salience measure gets to score the targeted weights."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..config import check_positive_int
from ..integrations.compat import in_out_features
from ..layer import SparsePeftLayer, dense_weight

logger = logging.getLogger(__name__)


def logical_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) float32 effective weight of a targeted module: base plus unmerged active
    deltas for a SPEFT layer."""
    if isinstance(module, SparsePeftLayer):
        return module.effective_weight()
    return dense_weight(module, isinstance(module, Conv1D))


@dataclass
class SalienceContext:
    """Inputs of a salience measure. `layers` maps module names to the targeted modules, in a fixed order;
    `micro_batch_size` splits each batch into terms of that many rows for the backward passes (`losses.loss_terms`)."""

    layers: dict[str, nn.Module]
    model: Optional[nn.Module] = None
    dataloader: Optional[Iterable[Any]] = None
    num_batches: int = 64
    dtype: torch.dtype = torch.float32
    device: Optional[torch.device] = None
    seed: int = 0
    budget: Optional[int] = None
    show_progress: bool = True
    micro_batch_size: Optional[int] = None
    batches_used: int = 0  # set by each pass of `batches()`: the divisor of batch means

    def __post_init__(self) -> None:
        check_positive_int("micro_batch_size", self.micro_batch_size, "rows per micro-batch", allow_none=True)

    def weight(self, name: str) -> torch.Tensor:
        """Effective (out, in) weight of one target as float32 (a transient dense copy)."""
        return logical_weight(self.layers[name])

    def score_tensor(self, scores: torch.Tensor, like: nn.Module) -> torch.Tensor:
        """`scores` in the configured score dtype, on the score device (default: the weight's device)."""
        device = self.device if self.device is not None else _weight_device(like)
        return scores.to(device=device, dtype=self.dtype)

    def batches(self, desc: str = "salience") -> Iterator[Any]:
        """Up to `num_batches` batches from the dataloader, with a progress bar. A shorter dataloader is used as it is,
        never cycled (a repeated batch costs a batch and adds no information): `batches_used` counts what a pass read,
        and a pass that got fewer than asked logs it."""
        if self.dataloader is None:
            raise ValueError("This salience measure needs data; pass a dataloader to calibrate/compute_salience.")
        used = 0
        total = min(self.num_batches, len(self.dataloader)) if hasattr(self.dataloader, "__len__") else None
        for batch in tqdm(itertools.islice(self.dataloader, self.num_batches), total=total or self.num_batches,
                          desc=desc, disable=not self.show_progress):
            used += 1
            yield batch
        if used == 0:
            raise ValueError("The salience dataloader yielded no batch.")
        if used < self.num_batches:
            logger.warning("salience used all %d batches of its dataloader, fewer than the %d asked for "
                           "(salience_batches)", used, self.num_batches)
        else:
            logger.info("salience used %d batches", used)
        self.batches_used = used

    def shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of one target."""
        in_features, out_features = in_out_features(_base(self.layers[name]))
        return out_features, in_features


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, SparsePeftLayer) else module


def _weight_device(module: nn.Module) -> torch.device:
    return _base(module).weight.device
