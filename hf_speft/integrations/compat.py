"""Every reliance of hf-speft on another library's internals, each with what it uses and why no public API serves.

A name of peft, transformers, trl, bitsandbytes or deepspeed that is private (`_`-prefixed) or undocumented is used
here and nowhere else: the rest of the package calls the functions below. `tests/test_compat.py` holds one contract
test per entry (it fails naming the upstream change) and a scan that refuses such names anywhere else in `hf_speft/`
and `recipes/`. `docs/development.md` ("What we rely on, and why") has one row per entry of `RELIANCES`.

Tuner hooks are not moved here: peft documents overriding `BaseTuner`'s and `BaseTunerLayer`'s underscore methods as
the way to write a tuner (LoRA, SHiRA and VeRA do). `TUNER_HOOKS` lists the ones SPEFT overrides, calls or sets, with
the parameters it relies on; the contract test checks they still exist with those parameters.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict  # noqa: F401 (an entry: see below)
from torch import nn

# entry -> the upstream names it relies on; the scan in tests/test_compat.py refuses them outside this module
# ("Owner.name": that attribute of that object, e.g. rebinding a method).
RELIANCES: dict[str, tuple[str, ...]] = {
    "BufferDict": ("_buffer_dict",),
    "in_out_features": ("_get_in_out_features",),
    "move_adapter_to_base_layer": ("_move_adapter_to_device_of_base_layer",),
    "replace_module": ("_replace_module",),
    "extend_peft_type": ("_name_", "_value_", "_member_map_", "_value2member_map_", "_member_names_", "_sort_order_"),
    "enable_mixed_tuner": ("COMPATIBLE_TUNER_TYPES", "PREFIXES", "Layers", "mixed_model.MixedModel"),
    "rebind_peft_model_methods": ("PeftModel.save_pretrained", "PeftModel.print_trainable_parameters"),
    "calibration_dataloader": ("_get_dataloader", "_train_batch_size", "_get_train_sampler"),
    "model_class": ("_get_model_class", "_model_mapping"),
    "loss_shifts_labels": ("LOSS_MAPPING", "ForCausalLMLoss", "ForMaskedLMLoss", "ForTokenClassification"),
    "set_attention_name": ("_attn_implementation",),
    "is_cpu_packed": ("packing_format_for_cpu",),
    "standard_layout_copy": ("_convert_weight_packed_for_cpu_inverse", "original_nested", "original_dtype"),
    "is_partitioned": ("ds_id",),
    "has_call_hooks": ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_hf_hook",
                       "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                       "_global_backward_pre_hooks"),
    "has_accelerate_hook": ("_hf_hook",),
    "is_view": ("_is_view",),
}

# The tuner hooks SPEFT overrides, calls or sets (peft's documented extension points; not moved here): "Owner.name"
# -> the parameters (after self/cls) SPEFT relies on, or None for an attribute. Owners: peft's BaseTuner,
# BaseTunerLayer, MixedModel (peft.tuners.mixed) and PeftModel (which enters the tuner's `_enable_peft_forward_hooks`
# around every forward and `generate`).
TUNER_HOOKS: dict[str, Optional[tuple[str, ...]]] = {
    "BaseTuner._create_and_replace": ("peft_config", "adapter_name", "target", "target_name", "parent",
                                      "current_key"),
    "BaseTuner._check_new_adapter_config": ("config",),
    "BaseTuner._cast_adapter_dtype": ("adapter_name", "autocast_adapter_dtype"),
    "BaseTuner._unload_and_optionally_merge": ("merge", "progressbar", "safe_merge", "adapter_names"),
    "BaseTuner._get_adapter_state_dict": ("model", "config", "adapter_name", "state_dict", "unwanted_adapter_names"),
    "BaseTuner._remap_adapter_state_dict_for_load": ("model", "config", "adapter_name", "state_dict"),
    "MixedModel._check_new_adapter_config": ("config",),
    "MixedModel._create_and_replace": ("config", "args", "kwargs"),
    "MixedModel._create_new_module": ("config", "adapter_name", "target"),
    "PeftModel._enable_peft_forward_hooks": ("args", "kwargs"),
    "BaseTunerLayer._active_adapter": None,
    "BaseTunerLayer._disable_adapters": None,
}


# ----------------------------------------------------------------------------------------------------------- torch
def is_view(tensor: torch.Tensor) -> bool:
    """True for a view into another tensor's storage (a slice, transpose or reshape that copied nothing): torch
    answers this only with the private `Tensor._is_view()` (and `_base`). The values' gradient saves such an input
    itself rather than a copy (`ops.input_for_values_grad`): whoever made the storage may keep it for backward."""
    return tensor._is_view()


# ------------------------------------------------------------------------------------------------------------ peft
# `BufferDict` (re-exported above): peft's dict of persistent buffers, which VeRA and SHiRA use for the same purpose;
# peft exports it from no public module, and a copy of it would drift from the one peft's state-dict code expects.


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a base layer by peft's `_get_in_out_features`: the rule peft's own tuners use,
    which also reads ZeRO-3 (`ds_shape`) and tensor-parallel (DTensor) weights; peft has no public equivalent."""
    from peft.tuners.tuners_utils import _get_in_out_features

    return _get_in_out_features(module)


def move_adapter_to_base_layer(layer: nn.Module, adapter_name: str) -> None:
    """Move adapter `adapter_name`'s tensors in a peft tuner layer to its base layer's device and floating dtype
    (integer tensors keep theirs; meta ones stay), by `BaseTunerLayer._move_adapter_to_device_of_base_layer`: what
    peft's own tuners call at the end of `update_layer`; peft has no public equivalent."""
    layer._move_adapter_to_device_of_base_layer(adapter_name)


def replace_module(tuner: nn.Module, parent: nn.Module, child_name: str, new_module: nn.Module,
                   child: nn.Module) -> None:
    """Put `new_module` (a new tuner layer wrapping `child`) in place of `child` as `parent.<child_name>`, by
    `BaseTuner._replace_module`, what peft's own tuners call from `_create_and_replace`: it also moves the new
    layer's tensors to the device of the weights they sit next to (meta-device placeholders included)."""
    tuner._replace_module(parent, child_name, new_module, child)


def extend_peft_type(name: str) -> Any:
    """`PeftType[name]`, adding the member first if peft does not have it.

    peft's `PeftType` is a closed `str` enum and `register_peft_method` accepts only its members, so an outside method
    needs a member; it is added the way `enum` itself builds members (name == value, so the string and the member are
    the same dict key). Idempotent.
    """
    from peft.utils.peft_types import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def enable_mixed_tuner(peft_type: Any, prefix: str, layer_cls: type, mixed_model_cls: type) -> None:
    """Let peft's mixed models (`PeftMixedModel`) hold adapters of an outside method (idempotent).

    peft's `MixedModel` lists the tuners it accepts in module globals (`COMPATIBLE_TUNER_TYPES`, `PREFIXES`, `Layers`)
    and `PeftMixedModel` builds `peft.mixed_model.MixedModel`; `register_peft_method(is_mixed_compatible=True)` fills
    none of them, and peft offers no other registration. The globals are extended (never shrunk) and
    `PeftMixedModel` builds `mixed_model_cls`, a `MixedModel` subclass that defers every other method to peft's.
    """
    import peft.mixed_model
    import peft.tuners.mixed
    from peft.tuners.mixed import model as mixed

    if peft_type not in mixed.COMPATIBLE_TUNER_TYPES:
        compatible = (*mixed.COMPATIBLE_TUNER_TYPES, peft_type)
        mixed.COMPATIBLE_TUNER_TYPES = peft.tuners.mixed.COMPATIBLE_TUNER_TYPES = compatible
    if prefix not in mixed.PREFIXES:
        mixed.PREFIXES.append(prefix)  # which parameters are adapter weights (trainable, not unloaded)
    if layer_cls not in mixed.Layers:
        mixed.Layers = (*mixed.Layers, layer_cls)  # set_adapter and bias handling visit these layers
    peft.mixed_model.MixedModel = mixed_model_cls


def rebind_peft_model_methods(applies: Callable[[nn.Module], bool],
                              check_save: Callable[[nn.Module, Optional[list[str]]], None],
                              stage: Callable[[nn.Module, str, Optional[list[str]]],
                                              contextlib.AbstractContextManager[str]],
                              after_save: Callable[[nn.Module, str, Optional[list[str]]], None],
                              notes: Callable[[nn.Module], Iterable[str]]) -> None:
    """Make `PeftModel.save_pretrained` and `PeftModel.print_trainable_parameters` serve an outside tuner (idempotent).

    - `save_pretrained` creates the folder and its README before any tuner hook runs, so a save the tuner refuses
      (an uncalibrated mask) would leave a folder behind: `check_save(model, selected_adapters)` runs first. On the
      main process peft then saves into `stage(model, save_directory, selected_adapters)` (a context manager giving
      the folder to write, which publishes it when the block succeeds), and `after_save(model, folder,
      selected_adapters)` runs there once peft has written the files (the model card is written from the model in
      memory, with no re-read of what peft just wrote); a save that fails anywhere leaves no half-written folder.
    - `print_trainable_parameters` counts parameters, and an uncalibrated mask has none yet: each of `notes(model)`
      is printed after peft's line.

    peft calls no tuner or config hook before it writes in `save_pretrained`, nor in `print_trainable_parameters`.
    For a model where `applies(model)` is False (no adapter of the outside method) the wrappers call peft's own
    methods with the same arguments and nothing else: output, files and errors are peft's.
    """
    from peft import PeftModel

    save, show = PeftModel.save_pretrained, PeftModel.print_trainable_parameters
    if getattr(save, "_speft_adapted", False):
        return
    signature = inspect.signature(save)

    @functools.wraps(save)
    def save_pretrained(self, *args: Any, **kwargs: Any):
        if not applies(self):
            return save(self, *args, **kwargs)
        arguments = signature.bind(self, *args, **kwargs)
        arguments.apply_defaults()
        selected = arguments.arguments["selected_adapters"]
        check_save(self, selected)
        if not arguments.arguments["is_main_process"]:
            return save(*arguments.args, **arguments.kwargs)
        with stage(self, arguments.arguments["save_directory"], selected) as folder:
            arguments.arguments["save_directory"] = folder
            result = save(*arguments.args, **arguments.kwargs)
            after_save(self, folder, selected)
        return result

    @functools.wraps(show)
    def print_trainable_parameters(self) -> None:
        show(self)
        if applies(self):
            for note in notes(self):
                print(note)

    save_pretrained._speft_adapted = True
    PeftModel.save_pretrained, PeftModel.print_trainable_parameters = save_pretrained, print_trainable_parameters


# ---------------------------------------------------------------------------------------------------- transformers
def calibration_dataloader(trainer: Any, dataset: Any) -> Any:
    """`dataset` batched, collated, sampled and sharded exactly as `trainer` batches training data.

    `Trainer.get_train_dataloader` reads only `trainer.train_dataset`; the same pipeline for another dataset is the
    private `_get_dataloader`, with the batch size the trainer really trains with (`_train_batch_size`, which
    `auto_find_batch_size` lowers) and its training sampler (`_get_train_sampler`).
    """
    return trainer._get_dataloader(
        dataset=dataset,
        description="Calibration",
        batch_size=trainer._train_batch_size,
        sampler_fn=trainer._get_train_sampler,
        is_training=True,
    )


def model_class(auto_class: Any, config: Any) -> type:
    """The model class `auto_class.from_config(config)` would build, without building it.

    The recipes build the model empty to check its targets before any weight is loaded; `from_config` would, under
    DeepSpeed ZeRO-3, partition even the empty weights. transformers resolves the class with the private
    `_get_model_class(config, auto_class._model_mapping)` (which picks among several by `config.architectures`).
    """
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, auto_class._model_mapping)


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss drops each row's first label (the causal-LM shift), as salience micro-batches must
    know to count a row's loss items. A ValueError when that cannot be known, so micro-batch weights are never wrong.

    transformers picks a model's loss by its `loss_type` in `LOSS_MAPPING` (falling back to the causal-LM loss for
    an unknown type), and says nothing public of what a loss counts. Known: `ForCausalLMLoss` shifts,
    `ForMaskedLMLoss` and `ForTokenClassification` do not. Refused: any other loss function (a renamed or new one),
    and an unknown `loss_type` on a model that does not generate (the fallback is then only a guess; many such
    models compute their loss themselves). Encoder-decoders (decoder labels, unshifted) and models that are not
    transformers models (their loss is their own: labels counted as given) need no lookup.
    """
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss, ForMaskedLMLoss, ForTokenClassification

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel) or getattr(base.config, "is_encoder_decoder", False):
        return False
    loss_type = getattr(base, "loss_type", None)
    fix = ("put `shift_labels` (the label each position's loss compares) in the salience batches, or set "
           "salience_micro_batch_size=None")
    if loss_type not in LOSS_MAPPING:
        if base.can_generate():
            return True  # transformers' own fallback for an unknown loss type: ForCausalLMLoss
        raise ValueError(f"Cannot weight salience micro-batches of {type(base).__name__}: its loss_type "
                         f"{loss_type!r} is unknown to transformers' LOSS_MAPPING, so how its loss counts label tokens "
                         f"is unknown; {fix}.")
    loss = LOSS_MAPPING[loss_type]
    if loss is ForCausalLMLoss:
        return True
    if loss in (ForMaskedLMLoss, ForTokenClassification):
        return False
    raise ValueError(f"Cannot weight salience micro-batches of {type(base).__name__}: its loss "
                     f"{getattr(loss, '__name__', loss)!r} (loss_type {loss_type!r}) is not one hf_speft knows "
                     f"(ForCausalLMLoss, ForMaskedLMLoss, ForTokenClassification), so how it counts label tokens is "
                     f"unknown; {fix}.")


def set_attention_name(model: nn.Module, name: str) -> None:
    """Make the model's attention layers call the attention function registered as `name` (`AttentionInterface`).

    The memory estimate registers an attention that saves what FlashAttention saves; its name must contain "flash"
    so that transformers builds no dense attention mask, as with FlashAttention. The public `set_attn_implementation`
    and `attn_implementation=` try to load such names as FlashAttention kernels, so the config's private
    `_attn_implementation` (what the layers read at each forward) is set directly.
    """
    model.config._attn_implementation = name


# ----------------------------------------------------------------------------------------------- torch, accelerate
_CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_call_hooks(module: nn.Module) -> bool:
    """True if calling `module` runs hooks: its own or global forward/backward hooks (torch keeps them in private
    dicts and offers no public query) or accelerate's `_hf_hook` (offload, device placement), which wraps `forward`.
    A scoped fold (`hf_speft.fold`) computes the base product without the call, so it runs only when this is False."""
    import torch.nn.modules.module as module_globals

    return (hasattr(module, "_hf_hook") or any(getattr(module, name) for name in _CALL_HOOKS)
            or any(getattr(module_globals, "_global" + name) for name in _CALL_HOOKS))


# ---------------------------------------------------------------------------------------------------- bitsandbytes
def is_cpu_packed(weight: torch.Tensor) -> bool:
    """True for a 4-bit weight in bitsandbytes' packed CPU layout: bitsandbytes marks it only by the undocumented
    `quant_state.packing_format_for_cpu` flag (see `integrations/bnb.py`)."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def standard_layout_copy(weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(data, quant_state) of a packed 4-bit weight converted to the standard layout, leaving `weight` untouched.

    bitsandbytes converts back only with the private `_convert_weight_packed_for_cpu_inverse`. The packed state holds
    the absmax already unnested and rounded to bf16, which is what the packed kernel computes with: it is kept exactly
    (transposed back to one scale per block; `original_nested` off), not re-nested as bitsandbytes' own inverse does,
    so the copy dequantizes to the weight the layer really uses.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    packed_state = weight.quant_state
    state = copy.copy(packed_state)
    state.original_nested = False  # keep the exact unnested absmax instead of quantizing it again
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), state)
    state.absmax = packed_state.absmax.t().reshape(-1).float().contiguous()
    state.dtype = getattr(packed_state, "original_dtype", torch.float32)
    return data, state


# ------------------------------------------------------------------------------------------------------- deepspeed
def is_partitioned(parameter: torch.Tensor) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3: DeepSpeed marks them with a `ds_id` attribute (what
    transformers, peft and accelerate test too); its own `is_zero_param` tests the same but imports DeepSpeed."""
    return hasattr(parameter, "ds_id")


# ------------------------------------------------------------------------------------------------------- accelerate
def has_accelerate_hook(module: nn.Module) -> bool:
    """True for a module accelerate has hooked (`add_hook_to_module`: offload, `dispatch_model`, `cpu_offload`):
    accelerate marks it only by the `_hf_hook` attribute (what transformers and peft test too)."""
    return hasattr(module, "_hf_hook")
