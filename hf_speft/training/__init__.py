"""Training with SPEFT: calibrate before the first step, dynamic mask updates, and the optimizer-state surgery those
updates need.

- `updater.MaskUpdater` does the work for any training loop (a plain PyTorch loop included); it needs no transformers.
- `callback.SpeftCallback` runs a `MaskUpdater`'s dynamic updates from any `transformers.Trainer`.
- `trainer.SpeftTrainerMixin` turns any `Trainer` subclass into a SPEFT trainer: it calibrates from the training data
  (or a `calibration_dataset`) before the wrapped model is built, adds the callback and reports SPEFT metrics in the
  Trainer's own logs. `trainer.SpeftTrainer` is the mixin on `transformers.Trainer`; `sft.SpeftSFTTrainer` the mixin
  on trl's `SFTTrainer`.

Checkpoints are the stock Trainer's: the adapter files (mask, values and the residual of dynamic updates), optimizer,
scheduler, RNG and trainer state. Dynamic updates happen at fixed global steps and draw their salience batches with
seeds derived from the update number, so a resumed run repeats an uninterrupted one exactly.
"""
