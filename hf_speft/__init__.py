"""hf-speft: salience-aware sparse parameter-efficient fine-tuning (SPEFT) as a peft method.

`import hf_speft` registers the method with peft, so `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModel*` and `PeftConfig.from_pretrained` handle SPEFT adapters.
"""

from .integrations.bnb import quiet_optional_kernel_notice

quiet_optional_kernel_notice()  # before peft imports bitsandbytes

from ._registry import SPEFT_PEFT_TYPE, register_sparse_peft  # noqa: E402
from .config import SparsePeftConfig
from .checkpoint import CorruptAdapterError
from .hub import push_to_hub, summarize_adapter, update_model_card
from .integrations.mixed import enable_mixed_adapters, save_mixed_adapter
from .layer import Linear, SparsePeftLayer, sparse_layers
from .masking import select_mask
from .masks import calibrate
from .measures import available_measures, register_salience
from .memory import MemoryEstimate, estimate_memory
from .model import SparsePeftModel, adapt_peft_model
from .salience import SalienceContext, compute_salience
from .training.updater import MaskUpdater

register_sparse_peft(config_cls=SparsePeftConfig, model_cls=SparsePeftModel)
enable_mixed_adapters()
adapt_peft_model()

# The Trainer classes import transformers' Trainer (and trl): they load on first access.
_LAZY = {
    "SpeftCallback": "training.callback",
    "SpeftTrainer": "training.trainer",
    "SpeftTrainerMixin": "training.trainer",
    "SpeftSFTTrainer": "training.sft",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "SPEFT_PEFT_TYPE",
    "CorruptAdapterError",
    "Linear",
    "MaskUpdater",
    "MemoryEstimate",
    "SalienceContext",
    "SparsePeftConfig",
    "SparsePeftLayer",
    "SparsePeftModel",
    "SpeftCallback",
    "SpeftSFTTrainer",
    "SpeftTrainer",
    "SpeftTrainerMixin",
    "available_measures",
    "estimate_memory",
    "calibrate",
    "compute_salience",
    "push_to_hub",
    "save_mixed_adapter",
    "register_salience",
    "select_mask",
    "sparse_layers",
    "summarize_adapter",
    "update_model_card",
]
