"""A learnable toy causal-LM task and trainer set-up shared by the trainer tests and the DDP worker script."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import TrainingArguments, default_data_collator

import hf_speft
from testing_common import tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]


def counting_dataset(size: int = 64, length: int = 16, seed: int = 0) -> Dataset:
    """Sequences start, start+stride, ... (mod 64), stride 0 or 1: a pattern a tiny model learns in a few dozen
    steps."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 64, (size, 1), generator=generator)
    stride = torch.randint(0, 2, (size, 1), generator=generator)
    ids = ((start + stride * torch.arange(length)) % 64).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def base_model(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_llama()


def speft_model(**config_kwargs):
    """A tiny Llama (seed 0) with a SPEFT adapter; the lm_head is targeted so the toy task is learnt quickly."""
    config = {"target_modules": TARGETS, "density": 0.05, "salience_batches": 4, **config_kwargs}
    return get_peft_model(base_model(), hf_speft.SparsePeftConfig(**config))


def training_args(output_dir, **kwargs) -> TrainingArguments:
    defaults = dict(per_device_train_batch_size=8, max_steps=12, learning_rate=5e-2, logging_steps=1,
                    report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                    lr_scheduler_type="constant", dataloader_drop_last=True)
    return TrainingArguments(str(output_dir), **{**defaults, **kwargs})


def speft_trainer(model, output_dir, dataset=None, **kwargs) -> hf_speft.SpeftTrainer:
    return hf_speft.SpeftTrainer(model=model, args=training_args(output_dir, **kwargs),
                                 train_dataset=dataset if dataset is not None else counting_dataset(),
                                 data_collator=default_data_collator)


def step_losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
