"""The fine-tuning methods compared at a matched budget (SPEFT, its hybrid, LoRA, PiSSA, full fine-tuning) and the
budget rules that make them comparable. The recipes and `estimate_memory` both build their peft configs here."""

from __future__ import annotations

from typing import Any, Optional

METHODS = ("speft", "speft+lora", "lora", "pissa", "full")
SPEFT_METHODS = ("speft", "speft+lora")
SPEFT_BUDGETS = ("density", "num_params", "match_lora_rank")


def hybrid_lora_r(lora_r: int) -> int:
    """The low-rank part of `speft+lora` at the budget of a rank-`lora_r` LoRA: half the rank (at least 1); the
    sparse mask takes the rest of the same budget."""
    return max(1, lora_r // 2)


def method_peft_config(method: str, *, target_modules: Any, lora_r: int = 8, lora_alpha: float = 8,
                       lora_dropout: float = 0.0, task_type: Optional[str] = None,
                       budget: Optional[dict[str, Any]] = None, hybrid_r: Optional[int] = None,
                       **speft_options: Any) -> Any:
    """The peft config `method` trains with, or None for full fine-tuning. LoRA and PiSSA (rank `lora_r`) and SPEFT
    (`budget`: one of `SPEFT_BUDGETS`, default `match_lora_rank=lora_r`) train the same number of weights.
    `speft+lora` is SPEFT's hybrid mode at the same budget, its low-rank part of rank `hybrid_r` (default
    `hybrid_lora_r(lora_r)`). `speft_options` are further `SparsePeftConfig` fields. Building it validates SPEFT's
    options (ValueError)."""
    from peft import LoraConfig

    from .config import SparsePeftConfig

    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; use one of {METHODS}.")
    budget = {name: value for name, value in (budget or {}).items() if value is not None}
    if method not in SPEFT_METHODS and budget:
        raise ValueError(f"{', '.join(budget)} sets a SPEFT budget; {method} uses lora_r.")
    if method == "full":
        return None
    if method in ("lora", "pissa"):
        return LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                          init_lora_weights="pissa_niter_4" if method == "pissa" else True, task_type=task_type)
    hybrid = {}
    if method == "speft+lora":
        hybrid_r = hybrid_r or hybrid_lora_r(lora_r)
        hybrid = dict(lora_r=hybrid_r, lora_alpha=lora_alpha * hybrid_r / lora_r, lora_dropout=lora_dropout)
    config = SparsePeftConfig(target_modules=target_modules, task_type=task_type,
                              **(budget or {"match_lora_rank": lora_r}), **hybrid, **speft_options)
    config.check_salience()  # it is built to train: its measure will build the mask
    return config
