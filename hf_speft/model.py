"""`SparsePeftModel`: the peft `BaseTuner` that injects `SparsePeftLayer`s and owns their masks and saved state."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .checkpoint import MASK_ATTRIBUTES, RESIDUAL_ATTRIBUTES, CorruptAdapterError, ModuleDelta, validated_module
from .config import SparsePeftConfig
from .layer import SUPPORTED_LAYERS, Linear, SparsePeftLayer, sparse_layers
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


def adapt_peft_model() -> None:
    """Two `PeftModel` methods made SPEFT-aware (idempotent; models without SPEFT adapters are unaffected):

    - `save_pretrained` creates the folder and its README before it asks the tuner for an adapter's tensors, where an
      uncalibrated SPEFT adapter is refused, so a refused save left a folder behind: the check now runs first.
    - `print_trainable_parameters` counts parameters, and an uncalibrated mask has none yet: it also says how many
      weights calibration will train.
    """
    if getattr(PeftModel.save_pretrained, "_speft_adapted", False):
        return
    save, show = PeftModel.save_pretrained, PeftModel.print_trainable_parameters
    signature = inspect.signature(save)

    @functools.wraps(save)
    def save_pretrained(self, *args: Any, **kwargs: Any):
        check_saveable(self, signature.bind(self, *args, **kwargs).arguments.get("selected_adapters"))
        return save(self, *args, **kwargs)

    @functools.wraps(show)
    def print_trainable_parameters(self) -> None:
        show(self)
        for name, budget in uncalibrated_budgets(self).items():
            print(f"SPEFT adapter {name!r} is not calibrated yet: its mask will train {budget:,} weights once "
                  "`hf_speft.calibrate` (or SpeftTrainer) runs")

    save_pretrained._speft_adapted = True
    PeftModel.save_pretrained, PeftModel.print_trainable_parameters = save_pretrained, print_trainable_parameters


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

    @staticmethod
    def _create_new_module(config: SparsePeftConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, SUPPORTED_LAYERS):
            raise TypeError(
                f"Target module {target.__class__.__name__} is not supported by SPEFT; supported are "
                "torch.nn.Linear and transformers' Conv1D."
            )
        return Linear(target, adapter_name, config=config, **kwargs)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, SparsePeftLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = self._create_new_module(config, adapter_name, target)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Wrap the targets and check the budget fits them, then build the mask right away when the configured salience
        measure needs no data."""
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
        )
        self.adapter_budget(adapter_name)
        if not low_cpu_mem_usage:
            self.build_data_free_masks(adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft upcasts half-precision adapter weights to float32. On a DeepSpeed ZeRO-3 partitioned base they keep
        the base dtype instead: ZeRO-3 gathers parameters in one dtype, and mixed fp32/bf16 parameters break it."""
        from .integrations.deepspeed import is_partitioned

        layers = sparse_layers(self.model, adapter_name).values()
        if any(is_partitioned(layer.get_base_layer().weight) for layer in layers):
            autocast_adapter_dtype = False
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft calls this around every forward and `generate`; it is where LoRA reads `adapter_names=` (mixed-adapter
        batches). SPEFT does not support them yet, so the argument is refused instead of silently dropped."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"SPEFT does not support mixed-adapter batches yet (adapter_names={kwargs['adapter_names']!r}); run the "
                "rows of each adapter separately after model.set_adapter(name)."
            )
        yield

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        for layer in sparse_layers(self.model).values():
            layer.restore_base_weight()
        return super()._unload_and_optionally_merge(*args, **kwargs)

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
        model.base_model._unload_and_optionally_merge(merge=False)
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
