"""SPEFT adapters in peft's mixed models (`get_peft_model(model, config, mixed=True)`, `PeftMixedModel`), beside
LoRA, LoHa, LoKr, AdaLoRA, OFT and SHiRA adapters on the same base.

peft's `MixedModel` lists the tuners it accepts in module-level tuples and dispatches on config types, so a method
registered with `is_mixed_compatible=True` is still refused there. `enable_mixed_adapters` (run on `import hf_speft`,
idempotent; `compat.enable_mixed_tuner`) adds SPEFT to those lists and makes `PeftMixedModel` build
`SpeftMixedModel`, a `MixedModel` that also creates SPEFT layers and owns their masks (`SparseMasks`), so
`calibrate`, `SpeftTrainer` and `MaskUpdater` work on a mixed model as on a plain SPEFT one. peft cannot save mixed
models; `save_mixed_adapter` writes one adapter of one
as `save_pretrained` would, loadable with `PeftModel.from_pretrained` or `PeftMixedModel.load_adapter`.
"""

from __future__ import annotations

import os
from typing import Any

from peft.tuners.mixed import model as mixed
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .._registry import PREFIX, SPEFT_PEFT_TYPE
from ..config import SparsePeftConfig
from ..layer import SparsePeftLayer
from ..masks import SparseMasks
from ..model import SparsePeftModel
from .compat import enable_mixed_tuner


class SpeftMixedModel(SparseMasks, mixed.MixedModel):
    """peft's `MixedModel`, also accepting `SparsePeftConfig` adapters."""

    def _check_new_adapter_config(self, config: Any) -> None:
        if isinstance(config, SparsePeftConfig):
            return BaseTuner._check_new_adapter_config(self, config)
        return super()._check_new_adapter_config(config)

    def _create_and_replace(self, config: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(config, SparsePeftConfig):
            return SparsePeftModel._create_and_replace(self, config, *args, **kwargs)
        return super()._create_and_replace(config, *args, **kwargs)

    @staticmethod
    def _create_new_module(config: Any, adapter_name: str, target: Any, **kwargs: Any):
        if isinstance(config, SparsePeftConfig):
            return SparsePeftModel._create_new_module(config, adapter_name, target, **kwargs)
        return mixed.MixedModel._create_new_module(config, adapter_name, target, **kwargs)

    def inject_adapter(self, model: Any, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        if isinstance(self.peft_config[adapter_name], SparsePeftConfig):
            self.check_injectable(adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if isinstance(self.peft_config[adapter_name], SparsePeftConfig) and not kwargs.get("low_cpu_mem_usage"):
            self.build_data_free_masks(adapter_name)


def enable_mixed_adapters() -> None:
    """Let peft's mixed models hold SPEFT adapters (safe to call again; see `compat.enable_mixed_tuner`)."""
    enable_mixed_tuner(SPEFT_PEFT_TYPE, PREFIX, SparsePeftLayer, SpeftMixedModel)


def save_mixed_adapter(model: Any, adapter_name: str, save_directory: str) -> None:
    """Save adapter `adapter_name` of a `PeftMixedModel` (weights in safetensors, config, and for SPEFT the model
    card), e.g. a SPEFT adapter trained on top of a frozen LoRA."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; the model has {sorted(model.peft_config)}.")
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    os.makedirs(save_directory, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state_dict.items()},
              os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = model.peft_config[adapter_name]
    if config.base_model_name_or_path is None:
        base_config = getattr(model.base_model.model, "config", None)
        config.base_model_name_or_path = getattr(base_config, "name_or_path", None)
    config.save_pretrained(save_directory)
