"""`SpeftCallback`: a `MaskUpdater`'s dynamic updates from any `transformers.Trainer`."""

from __future__ import annotations

from transformers import TrainerCallback

from .updater import MaskUpdater


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
