"""`SpeftTrainer` and `SpeftTrainerMixin`: any `transformers.Trainer` subclass as a SPEFT trainer (see the package
docstring)."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any, Optional

from torch import nn
from transformers import Trainer

from ..checkpoint import weights_file
from ..config import SparsePeftConfig
from ..hub import update_model_card
from ..integrations.compat import calibration_dataloader
from ..masks import speft_tuner
from .callback import SpeftCallback
from .updater import MaskUpdater

logger = logging.getLogger(__name__)


def run_settings(trainer: Any, max_length: Optional[int] = None) -> dict[str, Any]:
    """What a results file or model card needs to compare runs: optimisation settings, steps done, batch sizes,
    precision, seed (of any `transformers.Trainer`)."""
    args = trainer.args
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    world = trainer.accelerator.num_processes
    return {"learning_rate": args.learning_rate, "lr_scheduler": str(getattr(args.lr_scheduler_type, "value",
                                                                               args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps, "max_steps": args.max_steps, "num_train_epochs": args.num_train_epochs,
            "steps": trainer.state.global_step, "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": world,
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
            "max_length": max_length, "precision": precision, "device": "cpu" if args.use_cpu else str(args.device),
            "seed": args.seed}


def _gradient_checkpointing_guards(model: nn.Module, args: Any) -> None:
    """The guards trl's SFTTrainer applies to PEFT models with gradient checkpointing: reentrant checkpointing under
    DeepSpeed ZeRO-3 (non-reentrant recomputation sees partitioned weights, transformers#47254) and inputs that
    require grad, without which checkpointed blocks of a frozen base pass no gradient to the adapter."""
    # `activation_checkpointing*` is transformers' current name; `gradient_checkpointing*` its deprecated alias, which
    # mirrors it (and is the only name in older releases).
    if not getattr(args, "activation_checkpointing", args.gradient_checkpointing):
        return
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        kwargs = dict(getattr(args, "activation_checkpointing_kwargs", args.gradient_checkpointing_kwargs) or {})
        if kwargs.get("use_reentrant") is False:
            logger.warning("SPEFT with DeepSpeed ZeRO-3 needs reentrant gradient checkpointing; use_reentrant=False "
                           "is overridden to True.")
        kwargs["use_reentrant"] = True
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs
    model.enable_input_require_grads()


def _accepts_peft_config(init: Callable) -> bool:
    return "peft_config" in inspect.signature(init).parameters


_AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                 "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "QUESTION_ANS": "AutoModelForQuestionAnswering"}


def _wrapped(model: Any, peft_config: Any) -> nn.Module:
    """`model` (a module, or a Hub id / local path loaded with the config's task's Auto class) with the adapter."""
    import transformers
    from peft import get_peft_model

    if isinstance(model, str):
        task = getattr(peft_config.task_type, "value", peft_config.task_type)
        auto_class = getattr(transformers, _AUTO_CLASSES.get(task, "AutoModelForCausalLM"))
        model = auto_class.from_pretrained(model)
    if model is None:
        raise ValueError("Pass the model to train (a model, or a model id or path) with peft_config.")
    return get_peft_model(model, peft_config)


class SpeftTrainerMixin:
    """Makes any `transformers.Trainer` subclass a SPEFT trainer (see the module docstring).

    Args:
        model: A `PeftModel` with a SPEFT adapter; or, with `peft_config`, a plain model or a model id/path (as trl's
            `SFTTrainer(model=..., peft_config=...)`).
        peft_config: A `SparsePeftConfig` to wrap `model` with (`get_peft_model`). trl's `SFTTrainer` wraps it
            itself; for `Trainer` the mixin does, loading a model id/path with the Auto class of the config's
            `task_type` (causal LM by default).
        calibration_dataset: Dataset for salience (default: the training dataset), batched and collated like it.
    """

    def __init__(self, model: Any = None, *args: Any, peft_config: Any = None, calibration_dataset: Any = None,
                 **kwargs: Any) -> None:
        if peft_config is not None:
            if not isinstance(peft_config, SparsePeftConfig):
                raise TypeError(f"{type(self).__name__} trains SPEFT adapters; got peft_config of type "
                                f"{type(peft_config).__name__} (use Trainer/SFTTrainer for other peft methods).")
            if _accepts_peft_config(super().__init__):
                kwargs["peft_config"] = peft_config
            else:
                model = _wrapped(model, peft_config)
        super().__init__(model, *args, **kwargs)
        speft_tuner(self.model)
        _gradient_checkpointing_guards(self.model, self.args)
        self.calibration_dataset = calibration_dataset
        self._mask_updater: Optional[MaskUpdater] = None
        self.add_callback(_TrainerMaskUpdates(self))

    @property
    def mask_updater(self) -> MaskUpdater:
        """The `MaskUpdater` of the model's active SPEFT adapter, fed by `get_calibration_dataloader()`."""
        if self._mask_updater is None:
            show_progress = not self.args.disable_tqdm and self.is_local_process_zero()
            # The dataloader is built only if salience runs (not for an already calibrated, static adapter).
            self._mask_updater = MaskUpdater(self.model, self.get_calibration_dataloader, show_progress=show_progress)
        return self._mask_updater

    def get_calibration_dataloader(self):
        """Salience batches: the calibration (or training) dataset, batched, collated and sharded like training."""
        dataset = self.calibration_dataset if self.calibration_dataset is not None else self.train_dataset
        if dataset is None:
            raise ValueError("SPEFT salience needs data: pass `train_dataset` or `calibration_dataset` to the trainer.")
        return calibration_dataloader(self, dataset)

    def train(self, resume_from_checkpoint: Optional[str | bool] = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, calibrating the adapter first unless a checkpoint (which holds the mask) is resumed."""
        if self.mask_updater.config.mask_update == "dynamic" and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError(
                "mask_update='dynamic' edits the optimizer state of moved entries, which DeepSpeed and FSDP shard; "
                "use mask_update='static' with them."
            )
        if not resume_from_checkpoint and self.mask_updater.needs_calibration:
            self.mask_updater.calibrate()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's card (used by `push_to_hub`), with the SPEFT section and what this run knows of training."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero() and os.path.isfile(weights_file(self.args.output_dir)):
            update_model_card(self.args.output_dir, repo_id=self.hub_model_id, training=self._training_facts(kwargs))

    def _training_facts(self, card_kwargs: dict[str, Any]) -> dict[str, Any]:
        settings = run_settings(self, getattr(self.args, "max_length", None))
        facts: dict[str, Any] = {key.replace("_", " "): value for key, value in settings.items() if value is not None}
        dataset = card_kwargs.get("dataset") or card_kwargs.get("dataset_tags")
        if dataset:
            facts["data"] = dataset
        for entry in self.state.log_history:
            for key, value in entry.items():
                if key == "train_loss" or key.startswith("eval_"):
                    facts[key] = round(value, 4) if isinstance(value, float) else value
        return facts

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """`Trainer.log` with the SPEFT metrics recorded since the last log (salience time, densities, churn)."""
        if self._mask_updater is not None:
            logs = {**logs, **self._mask_updater.pop_metrics()}
        super().log(logs, *args, **kwargs)


class _TrainerMaskUpdates(SpeftCallback):
    """The mixin's callback: the updater is created lazily by the trainer."""

    def __init__(self, trainer: SpeftTrainerMixin) -> None:
        self.trainer = trainer

    @property
    def updater(self) -> MaskUpdater:
        return self.trainer.mask_updater


class SpeftTrainer(SpeftTrainerMixin, Trainer):
    """`transformers.Trainer` for SPEFT adapters: calibrates before the first step and runs dynamic mask updates.

    Example:
        ```py
        >>> model = get_peft_model(base, SparsePeftConfig(target_modules="all-linear", match_lora_rank=8))
        >>> trainer = SpeftTrainer(model=model, args=TrainingArguments("out"), train_dataset=train, data_collator=c)
        >>> trainer.train()
        >>> trainer.save_model("out/adapter")  # adapter_config.json + adapter_model.safetensors
        ```
    """
