"""`SparsePeftModel`: the peft `BaseTuner` that injects `SparsePeftLayer`s and owns their masks and saved state."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .checkpoint import (MASK_ATTRIBUTES, RESIDUAL_ATTRIBUTES, CorruptAdapterError, ModuleDelta, staged_folder,
                         validated_module)
from .config import SparsePeftConfig
from .compose import check_combination, compose_modules, composed_config
from .integrations.compat import is_partitioned, rebind_peft_model_methods, replace_module
from .layer import (SUPPORTED_LAYERS, AdapterRows, Linear, SparsePeftLayer, base_weight_is_writable, is_quantized,
                    sparse_layers)
from .masks import SparseMasks

def check_saveable(peft_model: nn.Module, adapter_names: Optional[list[str]] = None) -> None:
    """Raise the how-to-calibrate error if a SPEFT adapter among `adapter_names` (default: all) has no mask yet."""
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, SparseMasks):
        return
    for adapter_name in adapter_names or list(tuner.peft_config):
        for layer in sparse_layers(tuner.model, adapter_name).values():
            layer.check_calibrated(adapter_name)


def uncalibrated_budgets(peft_model: nn.Module) -> dict[str, int]:
    """Adapter name -> the number of weights its mask will train, for each SPEFT adapter not calibrated yet."""
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, SparseMasks):
        return {}
    return {name: tuner.adapter_budget(name) for name, config in tuner.peft_config.items()
            if isinstance(config, SparsePeftConfig)
            and any(name in layer.speft_uncalibrated for layer in sparse_layers(tuner.model, name).values())}


def write_model_cards(peft_model: nn.Module, save_directory: str, adapter_names: Optional[list[str]] = None) -> None:
    """After `peft_model.save_pretrained(save_directory)`: the SPEFT section of each saved SPEFT adapter's model card,
    from the model in memory (peft's layout: the "default" adapter in `save_directory`, the others in subfolders)."""
    from .hub import model_summary, update_model_card

    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, SparseMasks):
        return
    for name in adapter_names or list(tuner.peft_config):
        if isinstance(tuner.peft_config.get(name), SparsePeftConfig):
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            update_model_card(folder, summary=model_summary(peft_model, name, folder))


def staged_save(peft_model: nn.Module, save_directory: str,
                adapter_names: Optional[list[str]] = None) -> contextlib.AbstractContextManager[str]:
    """The folder a `save_pretrained(save_directory)` writes into (`checkpoint.staged_folder`: published only when the
    whole save succeeds), seeded with the model cards the save updates (peft's layout: "default" at the top)."""
    names = adapter_names or list(peft_model.peft_config)
    cards = tuple(os.path.join("" if name == "default" else name, "README.md") for name in {"default", *names})
    return staged_folder(save_directory, keep=cards)


def adapt_peft_model() -> None:
    """Two `PeftModel` methods made SPEFT-aware by `integrations.compat.rebind_peft_model_methods` (peft calls no tuner
    hook there; idempotent; for models without SPEFT adapters they are peft's own):

    - `save_pretrained` creates the folder and its README before it asks the tuner for an adapter's tensors, where an
      uncalibrated SPEFT adapter is refused, so a refused save left a folder behind: the check now runs first.
    - a save that fails (at any step) leaves no half-written folder: it is written aside and published at the end.
    - it also writes the SPEFT section of the model card, from the model in memory (`write_model_cards`).
    - `print_trainable_parameters` counts parameters, and an uncalibrated mask has none yet: it also says how many
      weights calibration will train.
    """
    rebind_peft_model_methods(
        applies=lambda model: isinstance(getattr(model, "base_model", None), SparseMasks),
        check_save=check_saveable,
        stage=staged_save,
        after_save=write_model_cards,
        notes=lambda model: [f"SPEFT adapter {name!r} is not calibrated yet: its mask will train {budget:,} weights "
                             "once `hf_speft.calibrate` (or SpeftTrainer) runs"
                             for name, budget in uncalibrated_budgets(model).items()],
    )


def _offloaded(model: nn.Module, key: str, target: nn.Module) -> bool:
    """Whether accelerate offloaded the weights of module `key` (to the CPU or disk, per the model's `hf_device_map`;
    peft removes the offload hooks before injecting, leaving them on the meta device)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    entries = [name for name in device_map if name == "" or key == name or key.startswith(name + ".")]
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    return bool(entries) and device_map[max(entries, key=len)] in ("cpu", "disk") and any(
        parameter.is_meta for parameter in base.parameters(recurse=False))


def _pass_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    """Forward pre-hook: the layer's forward gets `adapter_names=` (mixed-adapter batches)."""
    return args, {**kwargs, "adapter_names": adapter_names}


@dataclass
class _BeforeSwap:
    """The state the first `activate_adapter` swap changes, put back by `activate_adapter(None)`; `adapter` is the
    one swapped in now. `layers` (the SPEFT layers) and `auxiliary` (whether there are modules_to_save) are found
    once, so a swap walks no module tree; a new target layer (`_create_and_replace`) clears `layers`."""

    active_adapter: str | list[str]
    requires_grad: list[tuple[nn.Parameter, bool]]
    disabled: list[tuple[nn.Module, bool]]  # peft layers and modules_to_save, with their disable_adapters flag
    merged: list[tuple[SparsePeftLayer, list[str]]]
    auxiliary: bool
    layers: Optional[dict[str, SparsePeftLayer]] = None
    adapter: Optional[str] = None

    @classmethod
    def of(cls, tuner: SparsePeftModel) -> _BeforeSwap:
        modules = [module for module in tuner.model.modules()
                   if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        return cls(
            active_adapter=copy.copy(tuner.active_adapter),
            requires_grad=[(parameter, parameter.requires_grad) for parameter in tuner.model.parameters()],
            disabled=[(module, module.disable_adapters) for module in modules],
            merged=[(module, list(module.merged_adapters)) for module in modules
                    if isinstance(module, SparsePeftLayer) and module.merged],
            auxiliary=any(isinstance(module, AuxiliaryTrainingWrapper) for module in modules),
        )

    def swap_layers(self, tuner: SparsePeftModel) -> dict[str, SparsePeftLayer]:
        if self.layers is None:
            self.layers = sparse_layers(tuner.model)
        return self.layers


class SparsePeftModel(SparseMasks, BaseTuner):
    """Salience-aware sparse fine-tuning (SPEFT) as a peft tuner: θ = θ0 + θ_sp with θ_sp on a top-ρ mask.

    Example:
        ```py
        >>> import hf_speft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, hf_speft.SparsePeftConfig(target_modules=["q_proj", "v_proj"],
        ...                                                       density=0.005, salience="magnitude"))
        ```
    """

    prefix: str = "speft_"
    tuner_layer_cls = SparsePeftLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    _hot_swap: Optional[_BeforeSwap] = None  # set while activate_adapter has an adapter (or "__base__") swapped in

    @staticmethod
    def _create_new_module(config: SparsePeftConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, SUPPORTED_LAYERS):
            raise TypeError(
                f"Target module {target.__class__.__name__} is not supported by SPEFT; supported are "
                "torch.nn.Linear and transformers' Conv1D."
            )
        if is_quantized(base):  # bitsandbytes: the transient merge (loaded only when a quantized base is met)
            from .quantized import QuantizedLinear

            return QuantizedLinear(target, adapter_name, config=config, **kwargs)
        return Linear(target, adapter_name, config=config, **kwargs)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if getattr(self, "_hot_swap", None) is not None:  # also called on peft's mixed models, which have no swaps
            self._hot_swap.layers = None
        if _offloaded(self.model, current_key, target):
            raise ValueError(
                f"Cannot add a SPEFT adapter to {current_key!r}: accelerate offloaded its weights (they are on the "
                "meta device), and peft's offload files hold only LoRA-style adapter tensors. Create or load the "
                "adapter on the model first, then offload the PeftModel (accelerate's cpu_offload, disk_offload or "
                "dispatch_model)."
            )
        if isinstance(target, SparsePeftLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = self._create_new_module(config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        replace_module(self, parent, target_name, new_module, target)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Wrap the targets and check the budget fits them, then build the mask right away when the configured salience
        measure needs no data. A refusal on the way (a budget the targets cannot hold, `fold_weights=True` on a
        ZeRO-3 sharded base, an unsupported layer, ...) leaves `model` as it was: see `_undone_on_error`."""
        self.check_injectable(adapter_name)
        with self._undone_on_error(model, adapter_name):
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
            )
            self.adapter_budget(adapter_name)
            if not low_cpu_mem_usage:
                self.build_data_free_masks(adapter_name)

    @contextlib.contextmanager
    def _undone_on_error(self, model: nn.Module, adapter_name: str) -> Iterator[None]:
        """If the block raises, put `model` back as it was before: every module's children (peft replaces targets in
        place, wrapping them), every parameter's `requires_grad` (peft freezes the base), and no trace of
        `adapter_name` in layers that held other adapters already. Most refusals need the targets' shapes or layers,
        which peft finds only while it injects, so they are undone rather than checked ahead."""
        children = {module: dict(module.named_children()) for module in model.modules()}
        requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
        existing = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
        targeted = list(self.targeted_module_names)
        try:
            yield
        except BaseException:
            for layer in existing:
                if adapter_name in getattr(layer, "speft_values", {}):
                    layer.delete_adapter(adapter_name)
            for module, modules in children.items():
                current = dict(module.named_children())
                for name in current.keys() - modules.keys():
                    delattr(module, name)
                for name, child in modules.items():
                    if current.get(name) is not child:
                        setattr(module, name, child)
            for parameter, flag in requires_grad.items():
                parameter.requires_grad_(flag)
            self.targeted_module_names[:] = targeted
            raise

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft upcasts half-precision adapter weights to float32. On a DeepSpeed ZeRO-3 partitioned base they keep
        the base dtype instead: ZeRO-3 gathers parameters in one dtype, and mixed fp32/bf16 parameters break it."""
        layers = sparse_layers(self.model, adapter_name).values()
        if any(is_partitioned(layer.get_base_layer().weight) for layer in layers):
            autocast_adapter_dtype = False
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft calls this around every forward and `generate`: with `adapter_names=[...]` (one adapter name or
        `"__base__"` per row) each SPEFT layer runs every row through its own adapter, as peft's LoRA does. Inference
        only; with beam search (`num_beams`) each name covers its row's beams."""
        if getattr(self, "_hot_swap", None) is not None and self.training and torch.is_grad_enabled():
            raise ValueError(f"Adapter {self._hot_swap.adapter!r} is hot-swapped in (activate_adapter), which is for "
                             "inference; call model.activate_adapter(None) before training.")
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval().")
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise ValueError(f"adapter_names must be a list with one adapter name (or '__base__') per row; got "
                             f"{adapter_names!r}.")
        layers = sparse_layers(self.model).values()
        known = {name for layer in layers for name in layer.speft_values}
        unknown = sorted(set(adapter_names) - known - {"__base__"})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {unknown}; this model has "
                             f"{sorted(known)} (or '__base__' for none).")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            if getattr(self.model.config, "is_encoder_decoder", False):
                raise ValueError("adapter_names with beam search is supported for decoder-only models.")
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        hook = functools.partial(_pass_adapter_names, adapter_names=AdapterRows(adapter_names))
        handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in self.model.modules()
                   if isinstance(module, (SparsePeftLayer, AuxiliaryTrainingWrapper))]  # modules_to_save too
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ composing and hot-swapping adapters
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", density: Optional[float] = None,
                             majority_sign_method: str = "total", *, budget: Optional[int] = None,
                             seed: int = 0) -> None:
        """Add `adapter_name`, composed exactly from SPEFT `adapters` (see `hf_speft.compose`): `linear` and `cat`
        (the same for sparse deltas) sum `weights`·deltas on the union of the masks; `ties`, `dare_linear`,
        `dare_ties` and `magnitude_prune` follow peft, with `density` the fraction of each adapter's entries kept.
        `budget` keeps only that many entries (largest |value|, at least one per layer); `seed` draws DARE's masks.

        The result is an ordinary SPEFT adapter (mask = the kept entries, residuals folded in): save, merge, train or
        inspect it. It is added frozen and not activated, as in peft. Hybrid adapters (`lora_r > 0`) are refused: their
        low-rank parts do not compose exactly.
        """
        check_combination(len(adapters), weights, combination_type, density, majority_sign_method)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; pick a new name or delete it first.")
        layers = {name: set(sparse_layers(self.model, name)) for name in self._speft_adapters(adapters)}
        hybrid = [name for name in adapters if self.peft_config[name].lora_r]
        if hybrid:
            raise ValueError(f"Adapters {hybrid} are hybrid (lora_r > 0): their low-rank parts have no exact sparse "
                             "composition; compose sparse-only adapters.")
        first = adapters[0]
        for name in adapters[1:]:
            if layers[name] != layers[first]:
                difference = sorted(layers[name] ^ layers[first])[:3]
                raise ValueError(f"Adapters {first!r} and {name!r} target different modules (e.g. {difference}); "
                                 "only adapters on the same targets compose.")
        deltas = {}
        for module_name, layer in sparse_layers(self.model, first).items():
            for name in adapters:
                layer.check_calibrated(name)
            deltas[module_name] = [layer.delta_entries(name) for name in adapters]
        composed = compose_modules(deltas, weights, combination_type, density, majority_sign_method, budget, seed)
        self.peft_config[adapter_name] = composed_config(self.peft_config[first], composed)
        self.inject_adapter(self.model, adapter_name)
        for module_name, layer in sparse_layers(self.model, adapter_name).items():
            indices, values = composed[module_name]
            dtype = layer.speft_values[first].dtype
            layer.set_mask(adapter_name, indices, values=values.to(dtype))
        for name, parameter in self.model.named_parameters():  # frozen like peft's: modules_to_save copies too
            if adapter_name in name.split("."):
                parameter.requires_grad_(False)

    def activate_adapter(self, adapter_name: Optional[str]) -> None:
        """O(nnz) hot-swap for inference: write `adapter_name`'s sparse delta into the base weights in place, after
        which a forward costs exactly the base model's; `"__base__"`: the base model's own outputs. The entries a swap
        replaces are kept and written back by the next swap, so the weights are restored bit for bit in any float
        dtype; no dense copy is made.

        `None` ends hot-swapping: the model is put back exactly as it was before the first swap (base weights, active
        adapter, `requires_grad` flags, enabled and merged adapters), so training can go on. While an adapter is
        swapped in the model is inference-only: a swap in training mode, and a training forward after one, are
        refused. Also refused, before anything changes: quantized or ZeRO-3 sharded bases (no entry can be written in
        place; use `adapter_names=` or `set_adapter`), uncalibrated adapters and hybrid ones (a low-rank part is
        dense).
        """
        if adapter_name is None:
            self._end_hot_swap()
            return
        if self.training:
            raise ValueError(f"activate_adapter({adapter_name!r}) is for inference, but the model is in training mode; "
                             "call model.eval() first (set_adapter activates an adapter for training).")
        state = self._hot_swap or _BeforeSwap.of(self)
        layers = state.swap_layers(self)
        targeted = {} if adapter_name == "__base__" else self._swappable_layers(adapter_name, layers)
        self._hot_swap = state
        for layer in layers.values():
            if layer.merged:
                layer.unmerge()
        if adapter_name == "__base__":
            self.disable_adapter_layers()  # every SPEFT layer and modules_to_save: the base modules
        else:
            if any(layer.disable_adapters for layer in layers.values()):
                self.enable_adapter_layers()
            if state.auxiliary:  # modules_to_save follow the adapter too
                self.set_adapter(adapter_name, inference_mode=True)
            else:  # what set_adapter does, without walking the model: layers without the adapter run their base
                for layer in layers.values():
                    layer.set_adapter(adapter_name, inference_mode=True)
                self.active_adapter = adapter_name
            for layer in targeted.values():
                layer.merge(adapter_names=[adapter_name])
        state.adapter = adapter_name

    def _swappable_layers(self, adapter_name: str, layers: dict[str, SparsePeftLayer]) -> dict[str, SparsePeftLayer]:
        """The layers holding `adapter_name`, after refusing an adapter that cannot be hot-swapped."""
        self._speft_adapters([adapter_name])
        if self.peft_config[adapter_name].lora_r:
            raise ValueError(f"Adapter {adapter_name!r} is hybrid (lora_r > 0): its low-rank part is dense, so it "
                             "cannot be hot-swapped in O(nnz); use merge_adapter or set_adapter.")
        targeted = {name: layer for name, layer in layers.items() if adapter_name in layer.speft_values}
        for module_name, layer in targeted.items():
            layer.check_calibrated(adapter_name)
            if not base_weight_is_writable(layer.get_base_layer()):
                raise ValueError(f"Cannot hot-swap into {module_name!r}: its base weight is quantized or sharded "
                                 "(ZeRO-3); use model(..., adapter_names=[...]) or set_adapter instead.")
        return targeted

    def _end_hot_swap(self) -> None:
        """Swap the adapter out and put back the state `_BeforeSwap` recorded (a no-op when none is swapped in)."""
        before = self._hot_swap
        if before is None:
            return
        for layer in sparse_layers(self.model).values():
            if layer.merged:
                layer.unmerge()
        self.set_adapter(before.active_adapter)
        for module, disabled in before.disabled:
            module.enable_adapters(not disabled)
        for parameter, requires_grad in before.requires_grad:
            parameter.requires_grad_(requires_grad)
        for layer, names in before.merged:
            layer.merge(adapter_names=names)
        self._hot_swap = None

    def _speft_adapters(self, names: list[str]) -> list[str]:
        """`names` if every one is a SPEFT adapter of this model; a ValueError naming the others."""
        unknown = [name for name in names if not isinstance(self.peft_config.get(name), SparsePeftConfig)]
        if unknown:
            raise ValueError(f"{unknown} are not SPEFT adapters of this model; it has {sorted(self.peft_config)}.")
        return names

    # ------------------------------------------------------------------ saving and loading (peft#3490 hooks)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        for layer in sparse_layers(model, adapter_name).values():
            layer.check_calibrated(adapter_name)
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check every SPEFT tensor of the checkpoint against the model, then size the masks to fit it.

        Nothing in the model changes unless the whole checkpoint is valid; an adapter that `load_adapter` added for
        an invalid checkpoint is removed again, so the model is left as it was.
        """
        remapped = cls._with_residual_keys(
            super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict), model, adapter_name
        )
        try:
            checked = cls._validated_masks(model, adapter_name, remapped)
        except CorruptAdapterError:
            cls._remove_failed_adapter(model, adapter_name)
            raise
        layers = sparse_layers(model, adapter_name)
        for name, delta in checked.items():
            layers[name].set_mask(adapter_name, delta.indices, values=delta.values, residual=delta.residual)
        return remapped

    @staticmethod
    def _remove_failed_adapter(model, adapter_name: str) -> None:
        """Undo the injection of an adapter whose checkpoint was refused: `load_adapter` drops it; a failed
        `PeftModel.from_pretrained` (its only adapter) unwraps the caller's base model back to its own modules."""
        if not isinstance(model, PeftModel):
            return
        if len(model.peft_config) > 1:
            model.delete_adapter(adapter_name)
            return
        model.base_model.unload()
        model.peft_config.pop(adapter_name, None)

    @staticmethod
    def _with_residual_keys(remapped, model, adapter_name):
        """peft maps checkpoint keys to the keys the model has now; a residual (from dynamic mask updates) is created
        by loading, so its keys are mapped here."""
        wrapped = isinstance(model, PeftModel)
        renamed = {}
        for key, value in remapped.items():
            if key.endswith((".speft_residual_indices", ".speft_residual_values")):
                key = f"{key if wrapped else key.removeprefix('base_model.model.')}.{adapter_name}"
            renamed[key] = value
        return renamed

    @staticmethod
    def _validated_masks(model, adapter_name, remapped) -> dict[str, ModuleDelta]:
        """The validated delta of every SPEFT layer of `adapter_name` in a remapped checkpoint
        (`checkpoint.validated_module`), refusing missing and stray modules."""
        layers = sparse_layers(model, adapter_name)
        prefix = "base_model.model."
        model_keys = {name.removeprefix(prefix) for name in layers}
        checked = {}
        for name, layer in layers.items():
            entries = {attribute: remapped[key] for attribute in MASK_ATTRIBUTES + RESIDUAL_ATTRIBUTES
                       if (key := f"{name}.{attribute}.{adapter_name}") in remapped}
            checked[name] = validated_module(name, (layer.out_features, layer.in_features), entries)
        stray = sorted(
            key for key in remapped
            if ".speft_" in key and key.rpartition(".speft_")[0].removeprefix(prefix) not in model_keys
        )
        if stray:
            raise CorruptAdapterError(
                f"The checkpoint holds SPEFT tensors for modules this model does not target: {stray[:5]}; it was "
                "saved for a different base model or target_modules."
            )
        return checked
