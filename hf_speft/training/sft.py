"""`SpeftSFTTrainer`, trl's `SFTTrainer` with SPEFT calibration and dynamic mask updates."""

from __future__ import annotations

from trl import SFTTrainer

from .trainer import SpeftTrainerMixin


class SpeftSFTTrainer(SpeftTrainerMixin, SFTTrainer):
    """trl `SFTTrainer` for SPEFT, used as trl users use `SFTTrainer` with LoRA: `model` is a model id, a path or a
    model, and `peft_config=SparsePeftConfig(...)` (trl loads and wraps it); a `PeftModel` that already carries a
    SPEFT adapter works too.

    Everything of `SFTTrainer` applies (`SFTConfig`, prompt-completion data, completion-only loss); before the first
    step the adapter is calibrated on training batches (or `calibration_dataset`), with the same collator.

    Example:
        ```py
        >>> trainer = SpeftSFTTrainer(model="HuggingFaceTB/SmolLM2-135M", args=SFTConfig("out"),
        ...                           train_dataset=prompt_completion_data,
        ...                           peft_config=SparsePeftConfig(target_modules="all-linear", match_lora_rank=8))
        >>> trainer.train()
        ```
    """
