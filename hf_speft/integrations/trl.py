"""trl integration: `SpeftSFTTrainer`, trl's `SFTTrainer` with SPEFT calibration and dynamic mask updates."""

from __future__ import annotations

from trl import SFTTrainer

from ..trainer import SpeftTrainerMixin


class SpeftSFTTrainer(SpeftTrainerMixin, SFTTrainer):
    """trl `SFTTrainer` for a model that already carries a SPEFT adapter (pass the `PeftModel`, not `peft_config`).

    Everything of `SFTTrainer` applies (`SFTConfig`, prompt-completion data, completion-only loss); before the first
    step the adapter is calibrated on training batches (or `calibration_dataset`), with the same collator.

    Example:
        ```py
        >>> model = get_peft_model(base, SparsePeftConfig(target_modules="all-linear", match_lora_rank=8))
        >>> trainer = SpeftSFTTrainer(model=model, args=SFTConfig("out"), train_dataset=prompt_completion_data)
        >>> trainer.train()
        ```
    """
