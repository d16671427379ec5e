"""The registry of salience measures: name -> scoring function, and whether it needs data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from .context import SalienceContext

MeasureFn = Callable[["SalienceContext"], "dict[str, torch.Tensor]"]


@dataclass(frozen=True)
class SalienceMeasure:
    """A scoring function `fn(ctx) -> {module name: (out_features, in_features) scores}`; higher = keep."""

    name: str
    fn: MeasureFn
    data_free: bool


_MEASURES: dict[str, SalienceMeasure] = {}


def register_salience(name: str, fn: MeasureFn, *, data_free: bool = False, overwrite: bool = False) -> None:
    """Register a salience measure under `name`; `fn(ctx)` gets a `SalienceContext` and returns score tensors.

    `data_free=True` measures are computed inside `get_peft_model`; the others when `calibrate` runs.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"A salience measure needs a non-empty name without surrounding spaces; got {name!r}.")
    if not callable(fn):
        raise TypeError(f"The salience measure {name!r} must be callable; got {type(fn).__name__}.")
    if name in _MEASURES and not overwrite:
        raise ValueError(f"A salience measure named {name!r} is already registered; pass overwrite=True to replace.")
    _MEASURES[name] = SalienceMeasure(name=name, fn=fn, data_free=data_free)


def available_measures() -> list[str]:
    """Names of all registered salience measures."""
    return sorted(_MEASURES)


def get_measure(name: str) -> SalienceMeasure:
    """The registered measure called `name`, or a ValueError listing the registered ones."""
    try:
        return _MEASURES[name]
    except KeyError:
        raise ValueError(f"Unknown salience measure {name!r}; registered: {available_measures()}.") from None
