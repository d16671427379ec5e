"""The saved-adapter format: `adapter_model.safetensors` holds, per adapted module `<module>`, the tensors
`<module>.speft_indices` (sorted, unique flat positions in the (out, in) weight, int32 or int64),
`<module>.speft_values` (one float per index), `<module>.speft_weight_shape` ([out, in]) and, after dynamic mask
updates, `<module>.speft_residual_indices` / `<module>.speft_residual_values` (disjoint from the mask). In a
`PeftModel`'s state dict each key also ends in `.<adapter name>`; in the file it does not.

This module is the one reader and the file-level writer: loading into a model (`SparsePeftModel`), `hf-speft merge`,
`compose` and `inspect`, and the model card all read through it, so a damaged file is refused the same way everywhere,
naming the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE_WEIGHTS = "adapter_model.bin"  # what `save_pretrained(safe_serialization=False)` writes instead
ADAPTER_CONFIG = "adapter_config.json"
MASK_ATTRIBUTES = ("speft_indices", "speft_values", "speft_weight_shape")
RESIDUAL_ATTRIBUTES = ("speft_residual_indices", "speft_residual_values")


class CorruptAdapterError(ValueError):
    """A saved SPEFT adapter does not fit the model it is loaded into, or its tensors are malformed."""


@dataclass
class ModuleDelta:
    """One module's validated delta: the mask, its values and the frozen residual (if any)."""

    shape: tuple[int, int]
    indices: torch.Tensor  # int64
    values: torch.Tensor
    residual: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def all_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 indices, float32 values) of the whole delta, mask and residual."""
        if self.residual is None:
            return self.indices, self.values.float()
        return torch.cat([self.indices, self.residual[0]]), torch.cat([self.values.float(), self.residual[1].float()])


@contextlib.contextmanager
def _naming(file: str) -> Iterator[None]:
    """Turn safetensors' bare errors (e.g. "incomplete metadata") into a `CorruptAdapterError` naming `file`."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise CorruptAdapterError(f"Cannot read the adapter file {file}: {error}") from None


def weights_file(folder: str) -> str:
    """The adapter file in `folder`: `adapter_model.safetensors`, else the pickle file a
    `save_pretrained(safe_serialization=False)` writes, else (neither exists) the safetensors path."""
    pickled = os.path.join(folder, ADAPTER_PICKLE_WEIGHTS)
    safe = os.path.join(folder, ADAPTER_WEIGHTS)
    return pickled if os.path.isfile(pickled) and not os.path.isfile(safe) else safe


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file (or of the adapter file in a folder, see `weights_file`), safetensors or pickle
    (read with `weights_only=True`, as peft loads it); an unreadable file raises `CorruptAdapterError` naming it."""
    from safetensors.torch import load_file

    file = weights_file(path) if os.path.isdir(path) else path
    with _naming(file):
        if file.endswith(".bin"):
            return torch.load(file, map_location="cpu", weights_only=True)
        return load_file(file)


_OTHER_FORMAT = {ADAPTER_WEIGHTS: ADAPTER_PICKLE_WEIGHTS, ADAPTER_PICKLE_WEIGHTS: ADAPTER_WEIGHTS}


@contextlib.contextmanager
def staged_folder(folder: str, keep: tuple[str, ...] = ()) -> Iterator[str]:
    """A fresh folder to save into in place of `folder` (same name, in a temporary sibling of it). When the block
    ends without error, every file written there replaces its namesake in `folder` (created if absent; other files
    stay, except an adapter file of the other format, which peft would load in place of the new one); on error
    `folder` is left exactly as it was and nothing half-written remains. `keep` (paths relative to `folder`, e.g. a
    README.md a save updates rather than replaces) are copied into the stage first."""
    folder = os.path.abspath(folder)
    if os.path.isfile(folder):
        raise ValueError(f"Provided path ({folder}) should be a directory, not a file")  # peft's words
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    holder = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.saving-", dir=parent)
    stage = os.path.join(holder, os.path.basename(folder))
    try:
        os.makedirs(stage)
        for relative in keep:
            if os.path.isfile(os.path.join(folder, relative)):
                os.makedirs(os.path.dirname(os.path.join(stage, relative)), exist_ok=True)
                shutil.copy2(os.path.join(folder, relative), os.path.join(stage, relative))
        yield stage
        for root, _, files in os.walk(stage):
            target = os.path.join(folder, os.path.relpath(root, stage))
            os.makedirs(target, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(target, name))
                stale = _OTHER_FORMAT.get(name)
                if stale and os.path.isfile(os.path.join(target, stale)):
                    os.remove(os.path.join(target, stale))
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def check_readable(path: str) -> None:
    """Open a local adapter folder's weights file far enough to check its header (cheap), naming it if damaged."""
    from safetensors import safe_open

    file = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.isfile(file):
        with _naming(file), safe_open(file, framework="pt") as tensors:
            tensors.keys()


def validated_module(name: str, shape: tuple[int, int], entries: dict[str, torch.Tensor]) -> ModuleDelta:
    """Check one module's saved tensors (`MASK_ATTRIBUTES`, optionally `RESIDUAL_ATTRIBUTES`) against the (out, in)
    `shape` it is for: dtypes, ranks, counts, index range and order, finiteness, residual disjoint from the mask."""
    for attribute in MASK_ATTRIBUTES:
        if attribute not in entries:
            raise CorruptAdapterError(f"Module {name!r}: the checkpoint has no {attribute}; the file is incomplete or "
                                      "was saved for a different model or target_modules.")
    saved_shape = tuple(entries["speft_weight_shape"].tolist())
    if saved_shape != tuple(shape):
        raise CorruptAdapterError(
            f"Module {name!r}: the adapter was saved for a {saved_shape} weight but the base model has {tuple(shape)}; "
            "load it onto the base model it was trained on."
        )
    indices, values = _checked_entries(name, shape, entries["speft_indices"], entries["speft_values"])
    present = [attribute in entries for attribute in RESIDUAL_ATTRIBUTES]
    if not any(present):
        return ModuleDelta(tuple(shape), indices, values)
    if not all(present):
        raise CorruptAdapterError(f"Module {name!r}: the residual needs both indices and values; one is missing.")
    residual = _checked_entries(name, shape, *(entries[attribute] for attribute in RESIDUAL_ATTRIBUTES))
    if torch.isin(residual[0], indices).any():
        raise CorruptAdapterError(f"Module {name!r}: residual indices overlap the mask.")
    return ModuleDelta(tuple(shape), indices, values, residual)


def _checked_entries(name: str, shape: tuple[int, int], indices: torch.Tensor,
                     values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise CorruptAdapterError(f"Module {name!r}: speft_indices must be a 1-D int32/int64 tensor.")
    if values.dim() != 1 or not values.dtype.is_floating_point:
        raise CorruptAdapterError(f"Module {name!r}: speft_values must be a 1-D floating-point tensor.")
    if values.numel() != indices.numel():
        raise CorruptAdapterError(f"Module {name!r}: {values.numel()} values for {indices.numel()} indices.")
    numel = shape[0] * shape[1]
    indices = indices.to(torch.int64)
    if indices.numel() and (indices.min() < 0 or indices.max() >= numel):
        raise CorruptAdapterError(f"Module {name!r}: indices out of range [0, {numel}).")
    if (indices.diff() <= 0).any():
        raise CorruptAdapterError(f"Module {name!r}: indices are not strictly increasing (unsorted or repeated).")
    if not torch.isfinite(values).all():
        raise CorruptAdapterError(f"Module {name!r}: values contain NaN or inf.")
    return indices, values


def file_deltas(tensors: dict[str, torch.Tensor], source: str) -> dict[str, ModuleDelta]:
    """Module name (without peft's `base_model.model.` prefix) -> validated delta, for every SPEFT module of an
    adapter file's tensors; each module is checked against the shape it was saved with. Errors name `source`."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if ".speft_" not in key:
            continue
        module, attribute = key.rsplit(".", 1)
        grouped.setdefault(module.removeprefix("base_model.model."), {})[attribute] = tensor
    if not grouped:
        raise CorruptAdapterError(f"{source} holds no SPEFT tensors.")
    deltas = {}
    for name, entries in grouped.items():
        shape = entries.get("speft_weight_shape")
        if shape is None or shape.numel() != 2 or shape.is_floating_point() or (shape <= 0).any():
            raise CorruptAdapterError(f"{source}: module {name!r} has no valid speft_weight_shape.")
        try:
            deltas[name] = validated_module(name, tuple(int(v) for v in shape.tolist()), entries)
        except CorruptAdapterError as error:
            raise CorruptAdapterError(f"{source}: {error}") from None
    return deltas


def write_weights(folder: str, deltas: dict[str, ModuleDelta], values_dtype: torch.dtype = torch.float32) -> None:
    """Write `deltas` (module name without peft's prefix -> delta) as `folder`'s adapter file, in the layout
    `PeftModel.save_pretrained` writes (for adapters built outside a model, e.g. `hf-speft compose`)."""
    from safetensors.torch import save_file

    from .ops import index_dtype_for

    tensors = {}
    for name, delta in deltas.items():
        key = f"base_model.model.{name}"
        index_dtype = index_dtype_for(delta.shape[0] * delta.shape[1])
        tensors[f"{key}.speft_indices"] = delta.indices.to(index_dtype).contiguous()
        tensors[f"{key}.speft_values"] = delta.values.to(values_dtype).contiguous()
        tensors[f"{key}.speft_weight_shape"] = torch.tensor(delta.shape, dtype=torch.int64)
        if delta.residual is not None:
            tensors[f"{key}.speft_residual_indices"] = delta.residual[0].to(index_dtype).contiguous()
            tensors[f"{key}.speft_residual_values"] = delta.residual[1].to(values_dtype).contiguous()
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
