"""What the recipes share (script support, not library code): the method arguments they parse, checks of the model
and its targets before any weight loads, and how bad input is reported (one line, exit code 2, before any work)."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from hf_speft.methods import METHODS, SPEFT_BUDGETS, SPEFT_METHODS, method_peft_config


@dataclass
class MethodArguments:
    """The method a recipe trains with, and SPEFT's options (command-line flags of the same names)."""

    method: str = field(default="speft", metadata={"help": f"One of {METHODS}."})
    salience: Optional[str] = field(default=None, metadata={
        "help": "SPEFT salience measure (default: the library's for the task: magnitude for causal LMs, else "
                "gradient)."})
    mask_scope: str = field(default="global", metadata={"help": "SPEFT mask scope: global or local."})
    mask_update: str = field(default="static", metadata={"help": "SPEFT masks: static or dynamic."})
    update_interval: int = field(default=100, metadata={"help": "SPEFT dynamic update interval (steps)."})
    salience_batches: int = field(default=64, metadata={"help": "SPEFT salience batches (paper: 64 x 16)."})
    salience_micro_batch_size: Optional[int] = field(default=None, metadata={
        "help": "SPEFT salience: back-propagate each batch in micro-batches of this many rows (less memory, same "
                "mask)."})
    density: Optional[float] = field(default=None, metadata={"help": "SPEFT budget as a density."})
    num_params: Optional[int] = field(default=None, metadata={"help": "SPEFT budget as a count."})
    match_lora_rank: Optional[int] = field(default=None, metadata={"help": "SPEFT budget of a rank-r LoRA "
                                                                           "(default: --lora_r)."})
    hybrid_lora_r: Optional[int] = field(default=None, metadata={"help": "speft+lora: rank of the low-rank part, "
                                                                         "which takes that share of the same budget "
                                                                         "(default: half of --lora_r)."})

    def check(self) -> None:
        """A ValueError for an unknown method, a SPEFT budget given to another method, or two SPEFT budgets."""
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not allowed; use one of {METHODS}.")
        given = [name for name in SPEFT_BUDGETS if getattr(self, name) is not None]
        if self.method not in SPEFT_METHODS and given:
            raise ValueError(f"--{given[0]} sets a SPEFT budget; it does not apply to --method {self.method} (LoRA "
                             "and PiSSA use --lora_r).")
        if self.hybrid_lora_r is not None and self.method != "speft+lora":
            raise ValueError(f"--hybrid_lora_r applies to --method speft+lora, not --method {self.method}.")
        if self.hybrid_lora_r is not None and self.hybrid_lora_r < 1:
            raise ValueError(f"--hybrid_lora_r {self.hybrid_lora_r} is not allowed; it must be a positive rank.")
        if len(given) > 1:
            raise ValueError(f"Give one SPEFT budget, not {', '.join('--' + name for name in given)}.")


def peft_config_for(args: MethodArguments, *, target_modules: Any, lora_r: int, lora_alpha: int, task_type: str,
                    lora_dropout: float = 0.0) -> Any:
    """The peft config of `args.method` at the budget of a rank-`lora_r` LoRA (`hf_speft.methods.method_peft_config`),
    with the SPEFT options given on the command line."""
    return method_peft_config(
        args.method, target_modules=target_modules, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        task_type=task_type, budget={name: getattr(args, name) for name in SPEFT_BUDGETS}, hybrid_r=args.hybrid_lora_r,
        **({} if args.method not in SPEFT_METHODS else dict(
            salience=args.salience, mask_scope=args.mask_scope, mask_update=args.mask_update,
            update_interval=args.update_interval, salience_batches=args.salience_batches,
            salience_micro_batch_size=args.salience_micro_batch_size)))


def check_model_and_targets(model_name_or_path: str, peft_config: Any, auto_class: Any, **config_kwargs: Any) -> None:
    """Before any weight is loaded: the model's config can be read, `peft_config`'s targets match modules of its
    architecture (built empty, on the meta device) and a SPEFT budget fits them. ValueError otherwise."""
    from accelerate import init_empty_weights
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot load the model {model_name_or_path!r}: {str(error).splitlines()[0]}") from None
    if peft_config is None or peft_config.target_modules in (None, "all-linear"):
        return
    from hf_speft.integrations.compat import model_class

    # The model class itself, not `from_config`, which under DeepSpeed ZeRO-3 would partition the empty weights.
    with init_empty_weights():
        model = model_class(auto_class, config)(config)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    targets = {name: module for name, module in layers.items() if check_target_module_exists(peft_config, name)}
    if not targets:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
        wanted = peft_config.target_modules
        wanted = repr(wanted) if isinstance(wanted, str) else sorted(wanted)
        raise ValueError(f"--lora_target_modules {wanted} matches no linear layer of "
                         f"{model_name_or_path!r}; its linear layers are named {kinds}.")
    if hasattr(peft_config, "budget_split"):  # SPEFT: the budget must fit the targeted weights
        shapes = []
        for module in targets.values():
            out_features, in_features = module.weight.shape
            shapes.append((in_features, out_features) if isinstance(module, Conv1D) else (out_features, in_features))
        peft_config.budget_split(shapes)


def fixed_subset(rows: list, size: Optional[int]) -> list:
    """The same `size` rows in every run (drawn with seed 0, in their original order), or all rows."""
    if size is None or size >= len(rows):
        return rows
    chosen = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:size]
    return [rows[index] for index in sorted(chosen.tolist())]


def use_cpu_without_a_gpu(parser: Any) -> None:
    """Defaults that run on a machine without a GPU: `use_cpu=True` and fp32 (`bf16=False`; trl defaults to bf16,
    which TrainingArguments refuses without a GPU). Given options and `--config` values still win."""
    if not torch.cuda.is_available():
        parser.set_defaults(use_cpu=True, bf16=False)


def resolve_resume_checkpoint(training_args: Any) -> None:
    """`--resume_from_checkpoint`: `true` becomes the last `checkpoint-*` folder in `--output_dir` (the one
    `Trainer.train(resume_from_checkpoint=True)` picks), `false` none, anything else must be a folder; a ValueError
    otherwise, before any work. `train_and_save` resumes the folder this leaves in `training_args`."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() == "false":
        training_args.resume_from_checkpoint = None
        return
    output_dir = training_args.output_dir
    if str(value).lower() == "true":
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint true: --output_dir {output_dir!r} holds no checkpoint-* "
                             "folder to resume from.")
        training_args.resume_from_checkpoint = last
    elif not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a folder; give a checkpoint-* folder or true "
                         "(the last checkpoint in --output_dir).")


def train_and_save(trainer: Any, method: str) -> tuple[float, int]:
    """Run `trainer.train()` (resuming `--resume_from_checkpoint`, see `resolve_resume_checkpoint`: the trainer
    restores the adapter with its masks, the optimizer, scheduler, RNG and data position, and SpeftTrainer then runs
    no salience), print the trainable count (budgets are visibly matched) and save the model (an adapter for the peft
    methods) to the output folder; returns (train seconds, trainable parameters)."""
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"[{method}] trainable parameters: {trainable:,}", flush=True)
    trainer.save_model(trainer.args.output_dir)
    return seconds, trainable


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated by this process on CUDA, else its peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_losses(trainer: Any) -> list[float]:
    """The training losses the Trainer logged, in order."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def salience_seconds(trainer: Any) -> float:
    """Seconds `SpeftTrainer` spent calibrating (salience and mask selection, part of the train time); 0 for the
    other methods."""
    return sum(entry.get("speft/salience_seconds", 0.0) for entry in trainer.state.log_history)


class RecipeError(ValueError):
    """Bad arguments or data, reported before any work as one line and exit code 2."""


@contextlib.contextmanager
def user_input_checks() -> Iterator[None]:
    """Turn the ValueErrors of argument and data checks inside the block into `RecipeError`s."""
    try:
        yield
    except ValueError as error:
        raise RecipeError(str(error)) from None


def run_recipe(main: Callable[[], Any], name: str) -> None:
    """Run a recipe's `main`; a `RecipeError` becomes one line on stderr and exit code 2 (no traceback)."""
    try:
        main()
    except RecipeError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
