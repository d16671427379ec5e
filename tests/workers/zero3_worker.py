"""Worker for the DeepSpeed ZeRO-3 test, run as `torchrun --nproc_per_node 2 tests/workers/zero3_worker.py OUT_DIR
MODEL_DIR MEASURE DTYPE`: loads the tiny Llama in MODEL_DIR in DTYPE (float32 or bfloat16), partitioned by ZeRO-3
(from_pretrained after the TrainingArguments, as transformers requires), wraps it with SPEFT
(`speft_config(MEASURE)`), calibrates on this rank's share of `salience_batches()` (rank r takes batches r, r + W,
...), trains 3 steps with SpeftTrainer and gradient checkpointing, and saves the adapter. Each rank writes
OUT_DIR/rank{r}.pt with its world size, masks, whether the base weights were partitioned, the adapter values' dtype,
the losses and the engine's logits on a probe batch (eval mode).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from ddp_worker import salience_batches
from peft import get_peft_model
from trainer_helpers import counting_dataset
from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator

import hf_speft

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
PROBE = torch.arange(24).reshape(2, 12) % 64


def zero3_config(dtype: str) -> dict:
    return {
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }


def speft_config(measure: str) -> hf_speft.SparsePeftConfig:
    return hf_speft.SparsePeftConfig(target_modules=TARGETS, match_lora_rank=2, salience=measure, salience_batches=4)


def main(out_dir: str, model_dir: str, measure: str, dtype: str) -> None:
    args = TrainingArguments(out_dir, deepspeed=zero3_config(dtype), use_cpu=True, bf16=dtype == "bfloat16",
                             per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=3,
                             learning_rate=1e-2, logging_steps=1,
                             report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                             lr_scheduler_type="constant", dataloader_drop_last=True, activation_checkpointing=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    model = get_peft_model(model, speft_config(measure))
    hf_speft.calibrate(model, salience_batches()[dist.get_rank()::dist.get_world_size()], show_progress=False)
    trainer = hf_speft.SpeftTrainer(model=model, args=args, train_dataset=counting_dataset(),
                                    data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(out_dir)
    trainer.model_wrapped.eval()
    with torch.no_grad():
        logits = trainer.model_wrapped(input_ids=PROBE).logits
    layers = hf_speft.sparse_layers(model)
    torch.save({"world_size": dist.get_world_size(), "partitioned": partitioned,
                "masks": {name: layer.speft_indices["default"].clone() for name, layer in layers.items()},
                "values_dtypes": {str(layer.speft_values["default"].dtype) for layer in layers.values()},
                "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                "checkpointing_kwargs": args.activation_checkpointing_kwargs,
                "logits": logits}, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
