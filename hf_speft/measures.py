"""The registry of salience measures: name -> scoring function, and what the rest of the library must know about it.

Dependency-free on purpose: `config.py` checks measure names here without importing any measure's code, and the
command line (`hf_speft_cli`) runs this file on its own, outside the package, to list the built-in names in `--help`
without loading torch. The built-in measures are listed by module path and imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Union
from collections.abc import Callable

if TYPE_CHECKING:
    import torch

    from .salience.context import SalienceContext

MeasureFn = Callable[["SalienceContext"], "dict[str, torch.Tensor]"]


@dataclass(frozen=True)
class SalienceMeasure:
    """A scoring function `fn(ctx) -> {module name: (out_features, in_features) scores}` (higher = keep) and its
    contract:

    - `data_free`: needs no dataloader, so `get_peft_model` builds the mask right away;
    - `runs_model`: runs the model (under ZeRO-3 its full weights are gathered once for the pass); False: reads one
      layer's weight at a time;
    - `couples_layers`: a layer's scores depend on all targeted layers, so the targets cannot be scored in groups;
    - `reduces_across_ranks`: returns scores that are already identical on every process; otherwise they are averaged
      across processes once, after the measure.
    """

    name: str
    fn: Union[MeasureFn, str]  # "module:function" for a built-in not imported yet
    data_free: bool = False
    runs_model: bool = True
    couples_layers: bool = False
    reduces_across_ranks: bool = False


_GRADIENTS = "hf_speft.salience.gradients"
_MEASURES: dict[str, SalienceMeasure] = {
    spec.name: spec
    for spec in (
        SalienceMeasure("magnitude", "hf_speft.salience.data_free:magnitude", data_free=True, runs_model=False,
                        reduces_across_ranks=True),
        SalienceMeasure("random", "hf_speft.salience.data_free:random", data_free=True, runs_model=False,
                        reduces_across_ranks=True),
        SalienceMeasure("synflow", "hf_speft.salience.synflow:synflow", data_free=True, reduces_across_ranks=True),
        *(SalienceMeasure(name, f"{_GRADIENTS}:{name}", reduces_across_ranks=True)
          for name in ("gradient", "snip", "taylor", "skeleton", "fisher")),
        *(SalienceMeasure(name, f"{_GRADIENTS}:{name}", couples_layers=True, reduces_across_ranks=True)
          for name in ("grasp", "force")),
    )
}


def register_salience(name: str, fn: MeasureFn, *, data_free: bool = False, runs_model: bool = True,
                      couples_layers: bool = False, reduces_across_ranks: bool = False,
                      overwrite: bool = False) -> None:
    """Register a salience measure under `name`; `fn(ctx)` gets a `SalienceContext` and returns score tensors.

    `data_free=True` measures are computed inside `get_peft_model`; the others when `calibrate` runs. See
    `SalienceMeasure` for the other flags; the defaults are the safe ones for a measure that runs the model.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"A salience measure needs a non-empty name without surrounding spaces; got {name!r}.")
    if not callable(fn):
        raise TypeError(f"The salience measure {name!r} must be callable; got {type(fn).__name__}.")
    if name in _MEASURES and not overwrite:
        raise ValueError(f"A salience measure named {name!r} is already registered; pass overwrite=True to replace.")
    _MEASURES[name] = SalienceMeasure(name, fn, data_free=data_free, runs_model=runs_model,
                                      couples_layers=couples_layers, reduces_across_ranks=reduces_across_ranks)


def available_measures() -> list[str]:
    """Names of all registered salience measures."""
    return sorted(_MEASURES)


def measure_info(name: str) -> SalienceMeasure:
    """The registered measure called `name`, its function possibly not imported yet (for its flags), or a ValueError
    listing the registered ones."""
    try:
        return _MEASURES[name]
    except KeyError:
        raise ValueError(f"Unknown salience measure {name!r}; registered: {available_measures()}.") from None


def get_measure(name: str) -> SalienceMeasure:
    """The registered measure called `name`, with its function imported, or a ValueError listing the registered
    ones."""
    spec = measure_info(name)
    if isinstance(spec.fn, str):
        module, _, function = spec.fn.partition(":")
        spec = _MEASURES[name] = replace(spec, fn=getattr(importlib.import_module(module), function))
    return spec
