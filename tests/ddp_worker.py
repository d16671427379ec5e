"""Worker for the DDP tests, run as `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR MODE`:

- MODE `train`: trains a SPEFT adapter with dynamic masks through SpeftTrainer and saves each rank's world size,
  masks and values to OUT_DIR/rank{r}.pt.
- MODE `salience`: calibrates on this rank's share of `salience_batches()` (rank r takes batches r, r + W, ...) and
  saves the masks, to compare with one process calibrating on all of them.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from trainer_helpers import speft_model, speft_trainer

from hf_speft import calibrate, sparse_layers


def salience_batches(count: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(11)
    ids = [torch.randint(0, 64, (4, 12), generator=generator) for _ in range(count)]
    return [{"input_ids": batch, "labels": batch} for batch in ids]


def calibrated_masks(batches: list[dict]) -> dict[str, torch.Tensor]:
    model = speft_model(salience="gradient", salience_batches=len(batches))
    calibrate(model, batches, show_progress=False)
    return {name: layer.speft_indices["default"] for name, layer in sparse_layers(model).items()}


def salience(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    masks = calibrated_masks(salience_batches()[rank::world])
    torch.save({"world_size": world, "masks": masks}, os.path.join(out_dir, f"salience{rank}.pt"))
    dist.destroy_process_group()


def train(out_dir: str) -> None:
    model = speft_model(mask_update="dynamic", update_interval=2, salience_batches=2)
    trainer = speft_trainer(model, out_dir, max_steps=4, per_device_train_batch_size=4)
    trainer.train()
    state = {name: (layer.speft_indices["default"], layer.speft_values["default"].detach())
             for name, layer in sparse_layers(model).items()}
    torch.save({"world_size": dist.get_world_size(), "state": state,
                "churn_logged": any("speft/mask_churn" in log for log in trainer.state.log_history)},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    {"train": train, "salience": salience}[sys.argv[2]](sys.argv[1])
