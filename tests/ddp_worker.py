"""Worker for the DDP test: `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR` trains a SPEFT adapter with
dynamic masks on 2 CPU processes and saves each rank's world size, masks and values to OUT_DIR/rank{r}.pt."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from trainer_helpers import speft_model, speft_trainer

from hf_speft import sparse_layers


def main(out_dir: str) -> None:
    model = speft_model(mask_update="dynamic", update_interval=2, salience_batches=2)
    trainer = speft_trainer(model, out_dir, max_steps=4, per_device_train_batch_size=4)
    trainer.train()
    state = {name: (layer.speft_indices["default"], layer.speft_values["default"].detach())
             for name, layer in sparse_layers(model).items()}
    torch.save({"world_size": dist.get_world_size(), "state": state,
                "churn_logged": any("speft/mask_churn" in log for log in trainer.state.log_history)},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
