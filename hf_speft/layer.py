"""`SparsePeftLayer`: per-adapter sparse deltas on a frozen `nn.Linear` or transformers `Conv1D`.

Per adapter the layer holds `speft_indices` (sorted flat positions in the logical (out_features, in_features)
weight, int32 when they fit), `speft_values` (the trainable deltas, one per index) and `speft_weight_shape` (saved so
loading can check the base model). After dynamic mask updates, the deltas of entries that left the mask live on as a
frozen residual (`speft_residual_indices` / `speft_residual_values`, disjoint from the mask), so the adapter always
holds the whole fine-tune. In hybrid mode (`lora_r > 0`) an adapter also holds a low-rank pair `speft_lora_A` (r, in)
and `speft_lora_B` (out, r), added as LoRA adds it. Forward order follows peft's tuners: disabled -> merged -> deltas,
folded into the base product where `hf_speft.fold` applies (`fold_weights`), else added by the sparse ops.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .fold import entries_with_delta, flat_weight, fold_blocker, folded_product
from .integrations.compat import (BufferDict, has_accelerate_hook, in_out_features, is_partitioned,
                                  move_adapter_to_base_layer)
from .ops import SparsePattern, index_dtype_for, sparse_delta, transposed_positions

if TYPE_CHECKING:
    from .config import SparsePeftConfig

SUPPORTED_LAYERS = (nn.Linear, Conv1D)
UNCALIBRATED_MESSAGE = (
    "The SPEFT adapter {adapter!r} (salience {salience!r}) has no mask yet. Build it with "
    "`hf_speft.calibrate(model, dataloader)` (data-free measures such as 'magnitude' need no dataloader), or train "
    "with `hf_speft.SpeftTrainer`, which calibrates before the first step."
)


def base_weight_is_writable(base_layer: nn.Module) -> bool:
    """False for quantized or sharded (DeepSpeed ZeRO-3) weights, whose entries cannot be written in place."""
    weight = getattr(base_layer, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dtype.is_floating_point
        and type(weight) in (torch.Tensor, nn.Parameter)
        and not is_partitioned(weight)
        and weight.numel() > 0
    )


def is_quantized(base_layer: nn.Module) -> bool:
    """A bitsandbytes 8-bit/4-bit base (checked by class name, so bitsandbytes is imported only when present)."""
    return type(getattr(base_layer, "weight", None)).__name__ in ("Int8Params", "Params4bit")


def dense_weight(base_layer: nn.Module, transposed: bool) -> torch.Tensor:
    """The (out, in) float32 weight of a plain, bitsandbytes-quantized (dequantized: a copy) or ZeRO-3 partitioned
    (gathered: a copy) base layer. `transposed`: the layer stores Wᵀ (Conv1D)."""
    if is_quantized(base_layer):
        from .integrations.bnb import dequantized_weight

        return dequantized_weight(base_layer)
    from .integrations.deepspeed import gathered

    weight = base_layer.weight
    with gathered([weight]):  # ZeRO-3: one layer's weight at a time, copied before it is partitioned again
        weight = weight.detach()
        weight = (weight.t() if transposed else weight).float()
        return weight.clone() if is_partitioned(base_layer.weight) else weight


def sparse_layers(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, SparsePeftLayer]:
    """Module name -> SPEFT layer for every SPEFT layer in `model` (holding `adapter_name`, if given)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, SparsePeftLayer) and (adapter_name is None or adapter_name in module.speft_values)
    }


@dataclass
class _QuantizedOriginal:
    """The quantized weight (and 8-bit state) a merge replaced; restored as is by `unmerge`."""

    state: tuple


def _positions_in(sorted_reference: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """For each entry of `query`, its position in the sorted, unique `sorted_reference`, or -1 if absent."""
    if sorted_reference.numel() == 0:
        return torch.full_like(query, -1, dtype=torch.int64)
    positions = torch.searchsorted(sorted_reference, query).clamp_(max=sorted_reference.numel() - 1)
    return torch.where(sorted_reference[positions] == query, positions, -1)


class AdapterRows(list):
    """A mixed batch's adapter names, one per row, that also groups the rows by adapter: once per device, shared by
    every layer of a forward (and every step of a `generate`) that receives this list."""

    def rows(self, device: torch.device) -> list[tuple[str, Optional[torch.Tensor]]]:
        """(adapter name, int64 row indices on `device`, or None for all rows) per adapter, in first-row order."""
        cache = self.__dict__.setdefault("_rows", {})
        if device not in cache:
            names = list(dict.fromkeys(self))
            cache[device] = [(name, None) if len(names) == 1 else
                             (name, torch.tensor([i for i, row in enumerate(self) if row == name], device=device))
                             for name in names]
        return cache[device]


class ForwardParameterDict(nn.ParameterDict):
    """An `nn.ParameterDict` that can be read through its forward (`fetch`), so that accelerate's offload hooks on it
    run: accelerate (`cpu_offload`, `dispatch_model` with offloaded layers) hooks each module that holds tensors
    directly and brings them to the execution device only around that module's forward; indexed, they would stay on
    the meta device. (peft's LoRA survives offload the same way: its lora_A/B are modules whose forward runs.)"""

    __call__ = nn.Module.__call__  # nn.ParameterDict refuses to be called

    def forward(self, key: str) -> nn.Parameter:
        return self[key]

    def fetch(self, key: str) -> nn.Parameter:
        """`self[key]`, through the forward only when accelerate hooked this dict: DeepSpeed ZeRO-3 gathers an
        indexed parameter for the layer whose forward runs, but would release it again when the dict's own forward
        ends, before the layer has used it."""
        return self(key) if has_accelerate_hook(self) else self[key]


class SparsePeftLayer(BaseTunerLayer):
    """Tuner layer holding sparse deltas for one base layer; see the module docstring."""

    adapter_layer_names = ("speft_values", "speft_lora_A", "speft_lora_B")
    other_param_names = ("speft_indices", "speft_weight_shape", "speft_residual_indices", "speft_residual_values",
                         "speft_lora_scaling", "speft_lora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.speft_values = ForwardParameterDict({})
        self.speft_indices = BufferDict({}, persistent=True)
        self.speft_weight_shape = BufferDict({}, persistent=True)
        self.speft_residual_indices = BufferDict({}, persistent=True)
        self.speft_residual_values = BufferDict({}, persistent=True)
        self.speft_lora_A = ForwardParameterDict({})
        self.speft_lora_B = ForwardParameterDict({})
        self.speft_lora_dropout = nn.ModuleDict({})
        self.speft_lora_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self.in_features, self.out_features = in_out_features(self.get_base_layer())
        self.speft_salience: dict[str, str] = {}
        self.speft_fold_weights: dict[str, bool | str] = {}  # True, False or "auto" (see `_adapter_to_fold`)
        self.speft_kernel: dict[str, str] = {}
        self.speft_uncalibrated: set[str] = set()
        self._patterns: dict[str | tuple[str, str], SparsePattern] = {}
        self._merge_originals: dict[str, tuple[torch.Tensor, torch.Tensor] | _QuantizedOriginal] = {}
        self._positions: dict[str, tuple[list[tuple[torch.Tensor, int]], torch.Tensor]] = {}

    # ----------------------------------------------------------------- adapter state
    def update_layer(self, adapter_name: str, config: SparsePeftConfig, **kwargs: Any) -> None:
        """Add an adapter with an empty mask; `SparsePeftModel` fills it once all targets are known."""
        base_layer = self.get_base_layer()
        if config.fold_weights is True and not (base_weight_is_writable(base_layer) or is_quantized(base_layer)):
            raise ValueError(  # a quantized base merges transiently instead (`hf_speft.quantized`)
                f"fold_weights=True needs a plain floating-point or bitsandbytes-quantized base weight, but "
                f"{type(base_layer)} holds a sharded weight; use fold_weights='auto' (the default), which runs "
                "unfolded there."
            )
        self.speft_salience[adapter_name] = config.salience
        self.speft_fold_weights[adapter_name] = config.fold_weights
        self.speft_kernel[adapter_name] = config.kernel
        self.speft_weight_shape[adapter_name] = torch.tensor([self.out_features, self.in_features])
        self.set_mask(adapter_name, torch.zeros(0, dtype=torch.int64))
        self.speft_uncalibrated.add(adapter_name)
        if config.lora_r:
            self._add_low_rank(adapter_name, config)
        move_adapter_to_base_layer(self, adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _add_low_rank(self, adapter_name: str, config: SparsePeftConfig) -> None:
        """Hybrid mode's rank-`lora_r` pair, initialised as LoRA does (A Kaiming-uniform, B zero; B random too when
        `init_weights=False`)."""
        r = config.lora_r
        lora_a = torch.empty(r, self.in_features)
        lora_b = torch.zeros(self.out_features, r)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        if not config.init_weights:
            nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
        self.speft_lora_A[adapter_name] = nn.Parameter(lora_a)
        self.speft_lora_B[adapter_name] = nn.Parameter(lora_b)
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.speft_lora_dropout[adapter_name] = dropout
        self.speft_lora_scaling[adapter_name] = config.lora_alpha / r

    def low_rank_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The hybrid low-rank part scaling·B·A as a dense (out, in) float32 tensor, or None without one."""
        if adapter_name not in self.speft_lora_A:
            return None
        lora_a, lora_b = self.speft_lora_A[adapter_name], self.speft_lora_B[adapter_name]
        return (lora_b.detach().float() @ lora_a.detach().float()) * self.speft_lora_scaling[adapter_name]

    def low_rank_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The hybrid low-rank part's contribution to the output for input `x` (dropout, B·A, scaling)."""
        lora_a, lora_b = self.speft_lora_A.fetch(adapter_name), self.speft_lora_B.fetch(adapter_name)
        x = self.speft_lora_dropout[adapter_name](x.to(lora_a.dtype))
        return nn.functional.linear(nn.functional.linear(x, lora_a), lora_b) * self.speft_lora_scaling[adapter_name]

    def set_mask(
        self,
        adapter_name: str,
        indices: torch.Tensor,
        values: Optional[torch.Tensor] = None,
        init_weights: bool = True,
        generator: Optional[torch.Generator] = None,
        residual: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> None:
        """Give `adapter_name` the sorted, unique flat `indices` and their `values` (zeros, or random if not
        `init_weights`), and the frozen `residual` (indices, values) of earlier masks (default: none). The adapter must
        not be merged. The `speft_values` parameter object is kept, so optimizers built before calibration see it."""
        self._check_unmerged(adapter_name)
        numel = self.out_features * self.in_features
        indices = indices.detach().reshape(-1)
        self._check_indices(adapter_name, indices)
        if values is not None and values.shape != indices.shape:
            raise ValueError(f"Got {values.numel()} values for {indices.numel()} mask indices of {adapter_name!r}.")
        weight = self.get_base_layer().weight
        device = weight.device
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32)
            if not init_weights:
                # the scale of the weight the layer computes with (an int8/4-bit weight's storage has another)
                base = self.get_base_layer()
                dense = dense_weight(base, self.fan_in_fan_out) if is_quantized(base) else weight.detach().float()
                std = float(dense.std()) if dense.numel() > 1 else 1.0
                values = torch.randn(indices.numel(), generator=generator) * (std if math.isfinite(std) else 1.0)
        self.speft_indices[adapter_name] = indices.to(device=device, dtype=index_dtype_for(numel))
        previous = self.speft_values[adapter_name] if adapter_name in self.speft_values else None
        if previous is not None and not previous.is_meta:  # keep the Parameter object: an optimizer may hold it
            previous.data = values.detach().to(device=device, dtype=previous.dtype)
        else:  # new, or a placeholder of peft's low_cpu_mem_usage loading (meta tensors take no data)
            requires_grad = previous.requires_grad if previous is not None else True
            self.speft_values[adapter_name] = nn.Parameter(values.detach().to(device=device),
                                                           requires_grad=requires_grad)
        self._set_residual(adapter_name, *(residual if residual is not None else (indices[:0], values[:0])))
        self._patterns.pop(adapter_name, None)
        self.speft_uncalibrated.discard(adapter_name)

    def update_mask(self, adapter_name: str, indices: torch.Tensor) -> torch.Tensor:
        """Move the trainable entries to new `indices` (same count) without changing the layer's function.

        Entries that stay keep their value; entries that leave join the frozen residual (exact zeros are dropped);
        new entries take their residual value, or zero. The `speft_values` parameter object is kept (optimizers and
        DDP hold it), only its contents move. Returns, for each new entry, its position in the old mask or -1.
        """
        self._check_unmerged(adapter_name)
        old_indices = self.speft_indices[adapter_name].to(torch.int64)
        indices = indices.detach().reshape(-1).to(device=old_indices.device, dtype=torch.int64)
        self._check_indices(adapter_name, indices)
        if indices.numel() != old_indices.numel():
            raise ValueError(
                f"A mask update keeps the count of {adapter_name!r} ({old_indices.numel()}); got {indices.numel()}."
            )
        values = self.speft_values[adapter_name]
        all_indices, all_values = self.delta_entries(adapter_name)
        order = torch.argsort(all_indices)
        all_indices, all_values = all_indices[order], all_values[order]
        in_new = _positions_in(indices, all_indices) >= 0
        found = _positions_in(all_indices, indices)
        new_values = torch.zeros_like(values.data)
        new_values[found >= 0] = all_values[found[found >= 0]].to(values.dtype)
        leaving = ~in_new & (all_values != 0)
        kept_from = _positions_in(old_indices, indices)
        with torch.no_grad():
            values.copy_(new_values)
        self.speft_indices[adapter_name] = indices.to(index_dtype_for(self.out_features * self.in_features))
        self._set_residual(adapter_name, all_indices[leaving], all_values[leaving])
        self._patterns.pop(adapter_name, None)
        return kept_from

    def _set_residual(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        if indices.numel() == 0:
            if adapter_name in self.speft_residual_indices:
                del self.speft_residual_indices[adapter_name], self.speft_residual_values[adapter_name]
            self._patterns.pop(("residual", adapter_name), None)
            return
        device = self.speft_indices[adapter_name].device
        numel = self.out_features * self.in_features
        self.speft_residual_indices[adapter_name] = indices.detach().to(device=device, dtype=index_dtype_for(numel))
        dtype = self.speft_values[adapter_name].dtype
        self.speft_residual_values[adapter_name] = values.detach().to(device=device, dtype=dtype)
        self._patterns.pop(("residual", adapter_name), None)

    def _check_unmerged(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Unmerge the adapter {adapter_name!r} before changing its mask.")

    def _check_indices(self, adapter_name: str, indices: torch.Tensor) -> None:
        numel = self.out_features * self.in_features
        if indices.numel() and (indices.min() < 0 or indices.max() >= numel or (indices.diff() <= 0).any()):
            raise ValueError(
                f"Mask indices for adapter {adapter_name!r} must be sorted, unique and in [0, {numel}) for a "
                f"{self.out_features}x{self.in_features} weight."
            )

    def pattern(self, adapter_name: str, residual: bool = False) -> SparsePattern:
        """The CSR structures of an adapter's mask, or of its frozen residual (cached until they change)."""
        indices = (self.speft_residual_indices if residual else self.speft_indices)[adapter_name]
        key = ("residual", adapter_name) if residual else adapter_name
        cached = self._patterns.get(key)
        if cached is None or cached.crow.device != indices.device:
            cached = self._patterns[key] = SparsePattern(indices, self.out_features, self.in_features)
        return cached

    def check_calibrated(self, adapter_name: str) -> None:
        """Raise the how-to-calibrate error if the adapter has no mask yet."""
        if adapter_name in self.speft_uncalibrated:
            raise RuntimeError(
                UNCALIBRATED_MESSAGE.format(adapter=adapter_name, salience=self.speft_salience.get(adapter_name))
            )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for state in (self.speft_salience, self.speft_fold_weights, self.speft_kernel, self._patterns,
                      self._merge_originals, self._positions):
            state.pop(adapter_name, None)
        self._patterns.pop(("residual", adapter_name), None)
        self.speft_uncalibrated.discard(adapter_name)

    # ----------------------------------------------------------------- weight access
    def calibrated_active_adapters(self) -> list[str]:
        """The active adapters of this layer that have a mask (uncalibrated ones contribute nothing yet)."""
        return [name for name in self.active_adapters
                if name in self.speft_values and name not in self.speft_uncalibrated]

    def effective_weight(self) -> torch.Tensor:
        """The (out_features, in_features) float32 weight this layer computes with: the base plus its unmerged,
        calibrated active deltas (a dense copy when a delta is added or the base is quantized or sharded)."""
        weight = dense_weight(self.get_base_layer(), self.fan_in_fan_out)
        deltas = [] if self.merged or self.disable_adapters else self.calibrated_active_adapters()
        if not deltas:
            return weight
        weight = weight.clone(memory_format=torch.contiguous_format)
        flat = weight.view(-1)
        for name in deltas:
            indices, values = self.delta_entries(name)
            flat[indices] += values.float()
            low_rank = self.low_rank_delta(name)
            if low_rank is not None:
                weight += low_rank.to(weight.device)
        return weight

    def delta_entries(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 logical indices, detached values) of the adapter's whole delta: the mask plus the frozen residual."""
        return torch.cat([part.to(torch.int64) for part in self._index_parts(adapter_name)]), self._delta_values(
            adapter_name)

    def _index_parts(self, adapter_name: str) -> list[torch.Tensor]:
        if adapter_name not in self.speft_residual_indices:
            return [self.speft_indices[adapter_name]]
        return [self.speft_indices[adapter_name], self.speft_residual_indices[adapter_name]]

    def _delta_values(self, adapter_name: str) -> torch.Tensor:
        """The detached values of the adapter's whole delta, in `delta_entries` order."""
        values = self.speft_values[adapter_name].detach()
        if adapter_name not in self.speft_residual_indices:
            return values
        return torch.cat([values, self.speft_residual_values[adapter_name].to(values.dtype)])

    def _delta_positions(self, adapter_name: str) -> torch.Tensor:
        """`storage_positions` of the adapter's whole delta, kept while its index tensors are the same objects at
        the same version (a new mask or a device move makes new ones, a load bumps the version), so a hot-swap
        derives nothing. Inference tensors have no version counter: their positions are derived on every call."""
        parts = self._index_parts(adapter_name)
        cached = self._positions.get(adapter_name)
        if cached is not None and len(cached[0]) == len(parts) and all(
                part is held and part._version == version for part, (held, version) in zip(parts, cached[0])):
            return cached[1]
        positions = self.storage_positions(parts[0] if len(parts) == 1 else torch.cat(parts))
        if not any(part.is_inference() for part in parts):
            self._positions[adapter_name] = ([(part, part._version) for part in parts], positions)
        return positions

    def storage_positions(self, indices: torch.Tensor) -> torch.Tensor:
        """Positions of logical (row-major (out, in)) `indices` in the base weight's own storage (Conv1D stores Wᵀ),
        in the weight's index dtype (`index_dtype_for`): for an `nn.Linear` index buffer of that dtype, the buffer
        itself."""
        dtype = index_dtype_for(self.out_features * self.in_features)
        if self.fan_in_fan_out:
            return transposed_positions(indices, self.out_features, self.in_features).to(dtype)
        return indices.to(dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta in the base weight's layout (allocates a weight-sized tensor: for inspection/merging);
        float32
        (out, in) for a quantized base."""
        weight = self.get_base_layer().weight
        if is_quantized(self.get_base_layer()):
            shape, dtype = (self.out_features, self.in_features), torch.float32
        else:
            shape, dtype = weight.shape, weight.dtype
        indices, values = self.delta_entries(adapter_name)
        delta = torch.zeros(math.prod(shape), dtype=dtype, device=weight.device)
        delta[self.storage_positions(indices)] = values.to(dtype)
        delta = delta.view(shape)
        low_rank = self._low_rank_in_base_layout(adapter_name)
        return delta if low_rank is None else delta + low_rank.to(dtype)

    def _low_rank_in_base_layout(self, adapter_name: str) -> Optional[torch.Tensor]:
        low_rank = self.low_rank_delta(adapter_name)
        return low_rank.t() if low_rank is not None and self.fan_in_fan_out else low_rank

    # ----------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or given) adapters' deltas into the base weight; `unmerge` restores it exactly."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for adapter_name in adapter_names:
            if adapter_name not in self.speft_values:
                continue
            self.check_calibrated(adapter_name)
            if is_quantized(self.get_base_layer()):
                self._merge_quantized(adapter_name, safe_merge)
                continue
            flat, positions = flat_weight(self.get_base_layer()), self._delta_positions(adapter_name)
            original = flat.index_select(0, positions)
            merged = entries_with_delta(original, self._delta_values(adapter_name))  # what a fold computes with
            low_rank = self._low_rank_in_base_layout(adapter_name)
            if safe_merge and not (
                torch.isfinite(merged).all() and (low_rank is None or torch.isfinite(low_rank).all())
            ):
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken"
                )
            flat.index_put_((positions,), merged)  # positions are unique: W0+Δ at the mask, as a fold writes it
            if low_rank is not None:  # restored by subtraction, as LoRA's unmerge does
                self.get_base_layer().weight.data += low_rank.to(flat.dtype)
            self._merge_originals[adapter_name] = (positions, original)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Restore the base weight entries that `merge` replaced, most recent merge first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            saved = self._merge_originals.pop(adapter_name)
            if isinstance(saved, _QuantizedOriginal):
                from .integrations.bnb import restore_quantization_state

                restore_quantization_state(self.get_base_layer(), saved.state)
                continue
            positions, original = saved
            low_rank = self._low_rank_in_base_layout(adapter_name)
            if low_rank is not None:
                self.get_base_layer().weight.data -= low_rank.to(original.dtype)
            flat_weight(self.get_base_layer()).index_put_((positions,), original)

    def _merge_quantized(self, adapter_name: str, safe_merge: bool) -> None:
        """Dequantize, add the delta, requantize (warns); the original quantized weight is kept for `unmerge`."""
        from .integrations.bnb import dequantized_weight, quantization_state, write_requantized

        base_layer = self.get_base_layer()
        original = _QuantizedOriginal(quantization_state(base_layer))  # before dequantizing, which moves state
        weight = dequantized_weight(base_layer)
        indices, values = self.delta_entries(adapter_name)
        weight.view(-1)[indices] += values.float()
        low_rank = self.low_rank_delta(adapter_name)
        if low_rank is not None:
            weight += low_rank
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        self._merge_originals[adapter_name] = original
        write_requantized(base_layer, weight)
        self.merged_adapters.append(adapter_name)


class Linear(nn.Module, SparsePeftLayer):
    """SPEFT on a `torch.nn.Linear` or transformers `Conv1D` base layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SparsePeftConfig, **kwargs: Any) -> None:
        super().__init__()
        SparsePeftLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if torch.is_grad_enabled() and self.training:  # training an adapter without a mask would train nothing
            for name in self.active_adapters:
                if name in self.speft_values:
                    self.check_calibrated(name)
        active = self.calibrated_active_adapters()
        fold = self._adapter_to_fold(active, *args, **kwargs)
        if fold is not None:
            return self._folded_forward(fold, x)
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = self._with_delta(name, x, result)
        return result

    def _adapter_to_fold(self, active: list[str], *args: Any, **kwargs: Any) -> Optional[str]:
        """The adapter whose delta this forward folds into the base product (`hf_speft.fold`), if any: the only
        active adapter, when its `fold_weights` is True (else a ValueError naming why it cannot fold) or `"auto"` and
        the base allows it. Not under a `torch.compile` trace: the in-place writes would be functionalized into
        weight-sized copies."""
        setting = self.speft_fold_weights[active[0]] if len(active) == 1 else None
        if not setting:
            if any(self.speft_fold_weights[name] is True for name in active):
                raise ValueError(f"fold_weights=True supports one active adapter, but {active} are active; set one "
                                 "adapter active or use fold_weights='auto'.")
            return None
        blocker = "a torch.compile trace is running" if torch.compiler.is_compiling() else fold_blocker(
            self.base_layer, *args, **kwargs)
        if blocker is None:
            return active[0]
        if setting is True:
            raise ValueError(f"fold_weights=True cannot fold adapter {active[0]!r} here: {blocker}; use "
                             "fold_weights='auto', which runs unfolded where folding does not apply.")
        return None

    def _folded_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The base product computed with the adapter's whole delta folded into it (mask and frozen residual; the
        values' gradient is gᵀx at the mask), the low-rank part as LoRA adds it."""
        result = folded_product(self.base_layer, x, self._delta_positions(adapter_name),
                                self._delta_values(adapter_name), self.speft_values.fetch(adapter_name),
                                self.pattern(adapter_name), self.speft_kernel.get(adapter_name, "auto"),
                                x_kept_elsewhere=adapter_name in self.speft_lora_A)
        if adapter_name in self.speft_lora_A:
            result = result + self.low_rank_output(adapter_name, x).to(result.dtype)
        return result

    def _with_delta(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus the adapter's delta applied to `x`: the mask's values, the frozen residual and the low-rank
        part."""
        kernel, hybrid = self.speft_kernel.get(adapter_name, "auto"), adapter_name in self.speft_lora_A
        result = sparse_delta(result, x, self.speft_values.fetch(adapter_name), self.pattern(adapter_name),
                              kernel=kernel, x_kept_elsewhere=hybrid)  # the low-rank part saves x
        if adapter_name in self.speft_residual_indices:
            residual = self.speft_residual_values[adapter_name]
            result = sparse_delta(result, x, residual, self.pattern(adapter_name, residual=True), kernel=kernel)
        if hybrid:
            result = result + self.low_rank_output(adapter_name, x).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each row of the batch through its own adapter (`"__base__"`: none), as peft's LoRA does for
        `model(..., adapter_names=[...])`; an adapter this layer does not hold leaves its rows at the base output.
        Each adapter's rows get its delta in one sparse product, written into the base output (in place under
        no_grad / inference_mode)."""
        if len(adapter_names) != len(x):
            raise ValueError(f"Got {len(adapter_names)} adapter names for a batch of {len(x)} rows; give one per row.")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` while an adapter is merged into the base weights "
                             "(merge_adapter or activate_adapter); unmerge it first (unmerge_adapter() or "
                             "activate_adapter(None)).")
        groups = adapter_names if isinstance(adapter_names, AdapterRows) else AdapterRows(adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        for name, rows in groups.rows(x.device):
            if name == "__base__" or name not in self.speft_values:
                continue
            self.check_calibrated(name)
            if rows is None:  # the whole batch
                result = self._with_delta(name, x, result)
            else:
                delta = self._with_delta(name, x.index_select(0, rows), result.index_select(0, rows))
                if torch.is_grad_enabled():  # autograd refuses in-place writes into some outputs (views of a Function)
                    result = result.index_copy(0, rows, delta)
                else:
                    result.index_copy_(0, rows, delta)
        return result

    def __repr__(self) -> str:
        return "speft." + super().__repr__()
