"""`SpeftCallback`: a `MaskUpdater`'s dynamic updates from any `transformers.Trainer`."""

from __future__ import annotations

import functools
import logging

from transformers import TrainerCallback

from .updater import MaskUpdater

logger = logging.getLogger(__name__)

# The lowest rate SPEFT's sweeps chose: 2e-3 on SST-2 (MiniLM, benchmarks/results/quality_sst2_sweep.json); on GSM8K
# (SmolLM2-135M, benchmarks/results/quality_lm.json) 1e-3 with gradient salience, 3e-3 with magnitude (the causal-LM
# default). trl's default 2e-5 trains SPEFT much less.
SPEFT_LEARNING_RATE = 1e-3


@functools.cache
def warn_about_a_low_learning_rate(learning_rate: float) -> None:
    """Log, once per rate, that a SPEFT run starts at a rate more than 10x below the measured best."""
    if learning_rate < SPEFT_LEARNING_RATE / 10:
        logger.warning("SPEFT training starts with learning_rate=%g, more than 10x below %g, the lowest of SPEFT's "
                       "best rates in this project's sweeps (see docs/training.md): at rates this low a sparse "
                       "adapter may train much less.", learning_rate, SPEFT_LEARNING_RATE)


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
        if state.is_world_process_zero:
            warn_about_a_low_learning_rate(args.learning_rate)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.updater.step(state.global_step, optimizer)
