"""Training with SPEFT through transformers/trl: calibrate before the first step, dynamic mask updates, and the
optimizer-state surgery those updates need.

- `MaskUpdater` does the work for any training loop (a plain PyTorch loop included).
- `SpeftCallback` runs a `MaskUpdater`'s dynamic updates from any `transformers.Trainer`.
- `SpeftTrainerMixin` turns any `Trainer` subclass into a SPEFT trainer: it calibrates from the training data (or a
  `calibration_dataset`) before the wrapped model is built, adds the callback and reports SPEFT metrics in the
  Trainer's own logs. `SpeftTrainer` is the mixin on `transformers.Trainer`; `SpeftSFTTrainer` (in
  `hf_speft.integrations.trl`) is the mixin on trl's `SFTTrainer`.

Checkpoints are the stock Trainer's: the adapter files (mask, values and the residual of dynamic updates), optimizer,
scheduler, RNG and trainer state. Dynamic updates happen at fixed global steps and draw their salience batches with
seeds derived from the update number, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .model import sparse_layers, speft_tuner
from .salience import adapter_salience_groups, calibrate

logger = logging.getLogger(__name__)


def _innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate/Trainer wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Dynamic SPEFT masks edit the optimizer state of moved entries and need a torch.optim.Optimizer; got "
            f"{type(optimizer).__name__} (DeepSpeed/FSDP-managed optimizers are not supported: use mask_update='static')."
        )
    return optimizer


def remap_optimizer_state(optimizer: Any, parameter: nn.Parameter, kept_from: torch.Tensor, reset: str) -> None:
    """Carry `parameter`'s optimizer state through a mask update.

    `kept_from[j]` is the old position of new entry j, or -1 for an entry new to the mask. `reset="new"` keeps the
    per-entry state (e.g. Adam's moments) of entries that stay and zeroes it for new ones; `reset="all"` drops the
    parameter's whole state, as a freshly created optimizer would have it.
    """
    optimizer = _innermost_optimizer(optimizer)
    state = optimizer.state.get(parameter)
    if not state:
        return
    if reset == "all":
        del optimizer.state[parameter]
        return
    kept = kept_from >= 0
    sources = kept_from[kept].to(parameter.device)
    kept = kept.to(parameter.device)
    for value in state.values():
        if torch.is_tensor(value) and value.shape == parameter.shape and value.dim() > 0:
            moved = torch.zeros_like(value)
            moved[kept] = value[sources]
            value.copy_(moved)


@contextlib.contextmanager
def _isolated_rng(seed: Optional[int] = None) -> Iterator[None]:
    """Run salience without consuming the training RNG streams (optionally seeded for reproducible batches)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


class MaskUpdater:
    """Calibration and dynamic mask updates of one SPEFT adapter.

    Args:
        model: A `PeftModel` with a SPEFT adapter (not a DDP/accelerate wrapper: pass the unwrapped model).
        dataloader: Batches with labels for salience, or a function that builds them (called on first need only).
            A dynamic update calls its `set_epoch(update_number)` if it has one, so give the updater its own
            dataloader, not the training loop's.
        adapter_name: The adapter to calibrate and update (default: the active one).
        show_progress: Show a progress bar over the salience batches.

    Example (a plain training loop):
        ```py
        >>> updater = MaskUpdater(model, salience_loader)
        >>> updater.calibrate()  # before building the optimizer
        >>> optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
        >>> for step, batch in enumerate(train_loader, start=1):
        ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        ...     updater.step(step, optimizer)  # a dynamic update every `update_interval` steps
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Optional[Iterable[Any] | Callable[[], Iterable[Any]]],
        adapter_name: Optional[str] = None,
        show_progress: bool = True,
    ) -> None:
        self.tuner = speft_tuner(model)
        self.show_progress = show_progress
        self.model = model
        self._dataloader = dataloader
        self.adapter_name = adapter_name or self.tuner.active_adapters[0]
        if self.adapter_name not in self.tuner.peft_config:
            raise ValueError(f"No SPEFT adapter named {self.adapter_name!r}; have {sorted(self.tuner.peft_config)}.")
        self.config = self.tuner.peft_config[self.adapter_name]
        self._metrics: dict[str, float] = {}

    @property
    def dataloader(self) -> Optional[Iterable[Any]]:
        """The salience batches; a factory given instead is called once, when salience first needs them."""
        if callable(self._dataloader) and not isinstance(self._dataloader, Iterable):
            self._dataloader = self._dataloader()
        return self._dataloader

    @dataloader.setter
    def dataloader(self, dataloader: Optional[Iterable[Any]]) -> None:
        self._dataloader = dataloader

    @property
    def needs_calibration(self) -> bool:
        """True while the adapter has no mask (a data-dependent measure that has not run yet)."""
        return any(self.adapter_name in layer.speft_uncalibrated for layer in self._layers().values())

    def calibrate(self) -> dict[str, int]:
        """Compute salience, build the masks and record the time and the density per module type (the per-module
        densities are in the saved adapter's card and `hf-speft inspect`); returns nnz per module."""
        start = time.perf_counter()
        with _isolated_rng():
            counts = calibrate(self.model, self.dataloader, self.adapter_name, show_progress=self.show_progress)
        layers = self._layers()
        total = sum(layer.out_features * layer.in_features for layer in layers.values())
        self._metrics.update({
            "speft/salience_seconds": time.perf_counter() - start,
            "speft/trainable_params": sum(counts.values()),
            "speft/density": sum(counts.values()) / total,
        })
        kept: dict[str, list[int]] = {}  # per module type (q_proj, ...): a summary, not one entry per module
        for name, count in counts.items():
            layer = layers[name]
            totals = kept.setdefault(name.rsplit(".", 1)[-1], [0, 0])
            totals[0] += count
            totals[1] += layer.out_features * layer.in_features
        self._metrics.update({f"speft/density/{kind}": count / size for kind, (count, size) in kept.items()})
        return counts

    def is_due(self, global_step: int) -> bool:
        """Whether a dynamic update follows optimizer step `global_step`."""
        return (
            self.config.mask_update == "dynamic" and global_step > 0 and global_step % self.config.update_interval == 0
        )

    def step(self, global_step: int, optimizer: Any) -> Optional[float]:
        """After optimizer step `global_step`: run the dynamic update if one is due; returns its churn or None."""
        if not self.is_due(global_step):
            return None
        return self.update(optimizer, update_number=global_step // self.config.update_interval)

    def update(self, optimizer: Any, update_number: int = 0) -> float:
        """Recompute salience at the current weights, move every layer's entries to its new top ones (the model's
        function is unchanged) and carry the optimizer state over. Returns the churn: the fraction of entries
        replaced."""
        start = time.perf_counter()
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(update_number)
        moves: dict[str, torch.Tensor] = {}
        with _isolated_rng(self.config.seed + update_number):
            for scores in adapter_salience_groups(self.model, self.adapter_name, self.dataloader,
                                                  show_progress=self.show_progress):
                moves.update(self.tuner.update_masks(self.adapter_name, scores))
        layers = self._layers()
        replaced = total = 0
        for name, kept_from in moves.items():
            parameter = layers[name].speft_values[self.adapter_name]
            remap_optimizer_state(optimizer, parameter, kept_from, self.config.reset_optimizer)
            replaced += int((kept_from < 0).sum())
            total += kept_from.numel()
        churn = replaced / max(total, 1)
        seconds = time.perf_counter() - start
        logger.info("SPEFT mask update %d: %.2f%% of entries replaced in %.2fs", update_number, 100 * churn, seconds)
        self._metrics.update({"speft/mask_churn": churn, "speft/mask_update_seconds": seconds})
        return churn

    def pop_metrics(self) -> dict[str, float]:
        """Metrics recorded since the last call (for the Trainer's logs)."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    def _layers(self):
        return sparse_layers(self.tuner.model, self.adapter_name)


class SpeftCallback(TrainerCallback):
    """Runs a `MaskUpdater`'s dynamic updates after optimizer steps of any `transformers.Trainer`.

    With a stock Trainer, calibrate first (`updater.calibrate()`), then `Trainer(..., callbacks=[SpeftCallback(
    updater)])`. `SpeftTrainer` and `SpeftSFTTrainer` do both for you.
    """

    def __init__(self, updater: MaskUpdater) -> None:
        self.updater = updater

    def on_train_begin(self, args, state, control, **kwargs):
        if self.updater.needs_calibration:
            raise RuntimeError(
                "The SPEFT adapter has no mask yet: call `MaskUpdater.calibrate()` before `trainer.train()`, or use "
                "hf_speft.SpeftTrainer / SpeftSFTTrainer, which calibrate for you."
            )

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.updater.step(state.global_step, optimizer)


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
    import inspect

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
            from .config import SparsePeftConfig

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
        return self._get_dataloader(
            dataset=dataset,
            description="Calibration",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

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
        from .checkpoint import ADAPTER_WEIGHTS
        from .hub import update_model_card

        if self.is_world_process_zero() and os.path.isfile(os.path.join(self.args.output_dir, ADAPTER_WEIGHTS)):
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
