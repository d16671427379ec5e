"""Worker for the DDP tests, run as `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR MODE`:

- MODE `train`: trains a SPEFT adapter with dynamic masks through SpeftTrainer, folded (the default) and unfolded,
  and saves each rank's world size, masks and values to OUT_DIR/rank{r}.pt.
- MODE `salience`: calibrates on this rank's share of `salience_batches()` (rank r takes batches r, r + W, ...) and
  saves the masks, to compare with one process calibrating on all of them.
- MODE `fsdp2`: calibrates as in `salience`, shards the model with torch FSDP2 (`fully_shard` per decoder layer and
  at the root, CPU mesh), trains 3 steps on this rank's data, saves the gathered adapter (rank 0) and each rank's
  masks and logits on a probe batch.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.distributed as dist
from trainer_helpers import counting_dataset, speft_model, speft_trainer

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


def trained(out_dir: str, trainer_args: Optional[dict] = None, **config):
    model = speft_model(salience_batches=2, **config)
    trainer = speft_trainer(model, out_dir, max_steps=4, per_device_train_batch_size=4, **(trainer_args or {}))
    trainer.train()
    state = {name: (layer.speft_indices["default"], layer.speft_values["default"].detach())
             for name, layer in sparse_layers(model).items()}
    return state, trainer


def train(out_dir: str) -> None:
    state, trainer = trained(out_dir, mask_update="dynamic", update_interval=2)
    # the default folds; an unfolded run is the reference for its gradients, with SGD and static masks (Adam's
    # normalised step and a dynamic update's near-tied scores would magnify float32 rounding differences)
    sgd = {"optim": "sgd", "learning_rate": 1e-2}
    static = {fold_weights: trained(out_dir, sgd, fold_weights=fold_weights)[0] for fold_weights in ("auto", False)}
    torch.save({"world_size": dist.get_world_size(), "state": state, "static": static,
                "churn_logged": any("speft/mask_churn" in log for log in trainer.state.log_history)},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


def fsdp2(out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = speft_model(salience="gradient", salience_batches=4)
    calibrate(model, salience_batches()[rank::world], show_progress=False)  # before sharding: values get their size
    mesh = init_device_mesh("cpu", (world,))
    for decoder_layer in model.get_base_model().model.layers:
        fully_shard(decoder_layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.tensor(counting_dataset(size=12, seed=rank)["input_ids"])
    for step in range(3):
        batch = data[4 * step: 4 * step + 4]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        logits = model(input_ids=salience_batches()[0]["input_ids"]).logits
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=state)
    masks = {name: layer.speft_indices["default"] for name, layer in sparse_layers(model).items()}
    torch.save({"world_size": world, "masks": masks, "logits": logits}, os.path.join(out_dir, f"fsdp{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    {"train": train, "salience": salience, "fsdp2": fsdp2}[sys.argv[2]](sys.argv[1])
