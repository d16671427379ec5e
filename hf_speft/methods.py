"""The fine-tuning methods the recipes compare at a matched budget: SPEFT, LoRA, PiSSA and full fine-tuning."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

METHODS = ("speft", "lora", "pissa", "full")
SPEFT_BUDGETS = ("density", "num_params", "match_lora_rank")


def check_method_options(method: str, **budget: Optional[float]) -> None:
    """A ValueError for an unknown method, a SPEFT budget given to another method, or more than one SPEFT budget."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not allowed; use one of {METHODS}.")
    given = [name for name in SPEFT_BUDGETS if budget.get(name) is not None]
    if method != "speft" and given:
        raise ValueError(f"--{given[0]} sets a SPEFT budget; it does not apply to --method {method} (LoRA and PiSSA "
                         "use --lora_r).")
    if len(given) > 1:
        raise ValueError(f"Give one SPEFT budget, not {', '.join('--' + name for name in given)}.")


def prepare_model(model: nn.Module, method: str, *, target_modules: Any, lora_r: int, lora_alpha: int,
                  task_type: str, lora_dropout: float = 0.0, **speft_options: Any) -> nn.Module:
    """`model` ready to train with `method`: full fine-tuning returns it as is; LoRA and PiSSA (peft, rank `lora_r`)
    and SPEFT (`speft_options` are `SparsePeftConfig` fields; the budget defaults to `match_lora_rank=lora_r`) wrap
    it with `get_peft_model`. The trainable counts of LoRA, PiSSA and SPEFT are then equal."""
    from peft import LoraConfig, get_peft_model

    from .config import SparsePeftConfig

    if method == "full":
        return model
    if method in ("lora", "pissa"):
        return get_peft_model(model, LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            init_lora_weights="pissa_niter_4" if method == "pissa" else True, task_type=task_type))
    options = {key: value for key, value in speft_options.items() if value is not None}
    if not any(name in options for name in SPEFT_BUDGETS):
        options["match_lora_rank"] = lora_r
    return get_peft_model(model, SparsePeftConfig(target_modules=target_modules, task_type=task_type, **options))
