"""`MaskUpdater`: calibration and dynamic mask updates of one SPEFT adapter, for any training loop (no transformers
import)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn

from ..layer import sparse_layers
from ..masks import adapter_salience_groups, calibrate, speft_tuner

logger = logging.getLogger(__name__)


def _innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate/Trainer wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Dynamic SPEFT masks edit the optimizer state of moved entries and need a torch.optim.Optimizer; got "
            f"{type(optimizer).__name__} (DeepSpeed/FSDP-managed optimizers are not supported: use "
            "mask_update='static')."
        )
    return optimizer


def remap_optimizer_state(optimizer: Any, parameter: nn.Parameter, kept_from: torch.Tensor, reset: str) -> None:
    """Carry `parameter`'s optimizer state through a mask update.

    `kept_from[j]` is the old position of new entry j, or -1 for an entry new to the mask. `reset="new"` keeps the
    per-entry state (e.g. Adam's moments) of entries that stay and zeroes it for new ones; `reset="all"` drops the
    parameter's whole state, as a freshly created optimizer would have it.
    """
    optimizer = _innermost_optimizer(optimizer)
    state = optimizer.state.get(parameter)
    if not state:
        return
    if reset == "all":
        del optimizer.state[parameter]
        return
    kept = kept_from >= 0
    sources = kept_from[kept].to(parameter.device)
    kept = kept.to(parameter.device)
    for value in state.values():
        if torch.is_tensor(value) and value.shape == parameter.shape and value.dim() > 0:
            moved = torch.zeros_like(value)
            moved[kept] = value[sources]
            value.copy_(moved)


@contextlib.contextmanager
def _isolated_rng(seed: Optional[int] = None) -> Iterator[None]:
    """Run salience without consuming the training RNG streams (optionally seeded for reproducible batches)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


class MaskUpdater:
    """Calibration and dynamic mask updates of one SPEFT adapter.

    Args:
        model: A `PeftModel` with a SPEFT adapter (not a DDP/accelerate wrapper: pass the unwrapped model).
        dataloader: Batches with labels for salience, or a function that builds them (called on first need only).
            A dynamic update calls its `set_epoch(update_number)` if it has one, so give the updater its own
            dataloader, not the training loop's.
        adapter_name: The adapter to calibrate and update (default: the active one).
        show_progress: Show a progress bar over the salience batches.

    Example (a plain training loop):
        ```py
        >>> updater = MaskUpdater(model, salience_loader)
        >>> updater.calibrate()  # before building the optimizer
        >>> optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
        >>> for step, batch in enumerate(train_loader, start=1):
        ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        ...     updater.step(step, optimizer)  # a dynamic update every `update_interval` steps
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Optional[Iterable[Any] | Callable[[], Iterable[Any]]],
        adapter_name: Optional[str] = None,
        show_progress: bool = True,
    ) -> None:
        self.tuner = speft_tuner(model)
        self.show_progress = show_progress
        self.model = model
        self._dataloader = dataloader
        self.adapter_name = adapter_name or self.tuner.active_adapters[0]
        if self.adapter_name not in self.tuner.peft_config:
            raise ValueError(f"No SPEFT adapter named {self.adapter_name!r}; have {sorted(self.tuner.peft_config)}.")
        self.config = self.tuner.peft_config[self.adapter_name]
        self._metrics: dict[str, float] = {}

    @property
    def dataloader(self) -> Optional[Iterable[Any]]:
        """The salience batches; a factory given instead is called once, when salience first needs them."""
        if callable(self._dataloader) and not isinstance(self._dataloader, Iterable):
            self._dataloader = self._dataloader()
        return self._dataloader

    @property
    def needs_calibration(self) -> bool:
        """True while the adapter has no mask (a data-dependent measure that has not run yet)."""
        return any(self.adapter_name in layer.speft_uncalibrated for layer in self._layers().values())

    def calibrate(self) -> dict[str, int]:
        """Compute salience, build the masks and record the time and the density per module type (the per-module
        densities are in the saved adapter's card and `hf-speft inspect`); returns nnz per module."""
        start = time.perf_counter()
        with _isolated_rng():
            counts = calibrate(self.model, self.dataloader, self.adapter_name, show_progress=self.show_progress)
        layers = self._layers()
        total = sum(layer.out_features * layer.in_features for layer in layers.values())
        self._metrics.update({
            "speft/salience_seconds": time.perf_counter() - start,
            "speft/trainable_params": sum(counts.values()),
            "speft/density": sum(counts.values()) / total,
        })
        kept: dict[str, list[int]] = {}  # per module type (q_proj, ...): a summary, not one entry per module
        for name, count in counts.items():
            layer = layers[name]
            totals = kept.setdefault(name.rsplit(".", 1)[-1], [0, 0])
            totals[0] += count
            totals[1] += layer.out_features * layer.in_features
        self._metrics.update({f"speft/density/{kind}": count / size for kind, (count, size) in kept.items()})
        return counts

    def is_due(self, global_step: int) -> bool:
        """Whether a dynamic update follows optimizer step `global_step`."""
        return (
            self.config.mask_update == "dynamic" and global_step > 0 and global_step % self.config.update_interval == 0
        )

    def step(self, global_step: int, optimizer: Any) -> Optional[float]:
        """After optimizer step `global_step`: run the dynamic update if one is due; returns its churn or None."""
        if not self.is_due(global_step):
            return None
        return self.update(optimizer, update_number=global_step // self.config.update_interval)

    def update(self, optimizer: Any, update_number: int = 0) -> float:
        """Recompute salience at the current weights, move every layer's entries to its new top ones (the model's
        function is unchanged) and carry the optimizer state over. Returns the churn: the fraction of entries
        replaced."""
        start = time.perf_counter()
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(update_number)
        moves: dict[str, torch.Tensor] = {}
        with _isolated_rng(self.config.seed + update_number):
            for scores in adapter_salience_groups(self.model, self.adapter_name, self.dataloader,
                                                  show_progress=self.show_progress):
                moves.update(self.tuner.update_masks(self.adapter_name, scores))
        layers = self._layers()
        replaced = total = 0
        for name, kept_from in moves.items():
            parameter = layers[name].speft_values[self.adapter_name]
            remap_optimizer_state(optimizer, parameter, kept_from, self.config.reset_optimizer)
            replaced += int((kept_from < 0).sum())
            total += kept_from.numel()
        churn = replaced / max(total, 1)
        seconds = time.perf_counter() - start
        logger.info("SPEFT mask update %d: %.2f%% of entries replaced in %.2fs", update_number, 100 * churn, seconds)
        self._metrics.update({"speft/mask_churn": churn, "speft/mask_update_seconds": seconds})
        return churn

    def pop_metrics(self) -> dict[str, float]:
        """Metrics recorded since the last call (for the Trainer's logs)."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    def _layers(self):
        return sparse_layers(self.tuner.model, self.adapter_name)
