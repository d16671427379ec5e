"""SpeftTrainer / SpeftCallback / MaskUpdater: calibration, static and dynamic masks, optimizer surgery, resume."""

from __future__ import annotations

import os

import pytest
import torch
from testing_common import tiny_llama
from peft import PeftModel
from trainer_helpers import base_model, counting_dataset, speft_model, speft_trainer, step_losses, training_args
from transformers import Trainer, default_data_collator

import hf_speft
from hf_speft import MaskUpdater, SpeftCallback, sparse_layers


def batch(size=8, seed=5):
    rows = counting_dataset(size, seed=seed)
    return {key: torch.tensor(rows[key]) for key in ("input_ids", "labels")}


def reversed_batch(seed):
    rows = batch(seed=seed)
    return {key: value.flip(1) for key, value in rows.items()}


def masks_and_values(model):
    return {name: (layer.speft_indices["default"].clone(), layer.speft_values["default"].detach().clone())
            for name, layer in sparse_layers(model).items()}


def test_trainer_calibrates_trains_and_changes_only_mask_positions(tmp_path):
    model = speft_model()
    assert MaskUpdater(model, None).needs_calibration
    trainer = speft_trainer(model, tmp_path, max_steps=30)
    trainer.train()

    losses = list(step_losses(trainer).values())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    first_log = trainer.state.log_history[0]
    assert first_log["speft/trainable_params"] == sum(v.numel() for _, v in masks_and_values(model).values())
    assert first_log["speft/salience_seconds"] > 0
    # One density per module type, not per module (a 7B model has 210 targeted modules).
    assert {key for key in first_log if key.startswith("speft/density/")} == {
        f"speft/density/{kind}" for kind in ("q_proj", "v_proj", "up_proj", "down_proj", "lm_head")}
    total = sum(layer.speft_values["default"].numel() for name, layer in sparse_layers(model).items()
                if name.endswith("q_proj"))
    size = sum(layer.out_features * layer.in_features for name, layer in sparse_layers(model).items()
               if name.endswith("q_proj"))
    assert first_log["speft/density/q_proj"] == pytest.approx(total / size)
    # The optimizer holds the sparse values only (O(nnz) state).
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(layer.speft_values["default"]) for layer in sparse_layers(model).values()}

    masks = {name.removeprefix("base_model.model."): layer.storage_positions(layer.speft_indices["default"])
             for name, layer in sparse_layers(model).items()}
    pristine = base_model()
    merged = model.merge_and_unload()
    changed = 0
    for name, positions in masks.items():
        before = pristine.get_submodule(name).weight.detach().reshape(-1)
        after = merged.get_submodule(name).weight.detach().reshape(-1)
        outside = torch.ones_like(before, dtype=torch.bool)
        outside[positions] = False
        assert torch.equal(before[outside], after[outside])
        changed += int((before[positions] != after[positions]).sum())
    assert changed > 0.9 * sum(p.numel() for p in masks.values())


def test_save_model_writes_a_loadable_adapter(tmp_path):
    model = speft_model()
    trainer = speft_trainer(model, tmp_path, max_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter")
    inputs = batch()
    model.eval()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("fold_weights", [False, True])
def test_dynamic_update_keeps_outputs_and_moves_the_mask(tmp_path, fold_weights):
    model = speft_model(mask_update="dynamic", update_interval=100, fold_weights=fold_weights)
    updater = MaskUpdater(model, [batch(seed=1)])
    updater.calibrate()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for seed in range(4):
        model(**batch(seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    inputs = batch(seed=9)
    before_logits = model(**inputs).logits.detach()
    before = masks_and_values(model)

    churn = updater.update(optimizer, update_number=1)

    after = masks_and_values(model)
    assert 0 < churn <= 1
    assert any(not torch.equal(before[name][0], after[name][0]) for name in before)
    for name, (indices, _) in after.items():  # counts per layer are kept
        assert indices.numel() == before[name][0].numel()
    torch.testing.assert_close(model(**inputs).logits, before_logits, atol=1e-5, rtol=1e-5)
    assert updater.pop_metrics()["speft/mask_churn"] == churn

    # The residual of the moved-out entries is part of the saved adapter and of merges.
    assert any("default" in layer.speft_residual_indices for layer in sparse_layers(model).values())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path)
    torch.testing.assert_close(reloaded(**inputs).logits, before_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.merge_and_unload()(**inputs).logits, before_logits, atol=1e-5, rtol=1e-5)


def test_dynamic_mask_follows_the_gradient():
    model = speft_model(mask_update="dynamic", salience="gradient")
    MaskUpdater(model, [batch(seed=1)]).calibrate()
    layer = max(sparse_layers(model).values(), key=lambda layer: layer.speft_values["default"].numel())
    first = layer.speft_indices["default"].clone()
    # A different task (reversed sequences) has different weight gradients, so the mask must move.
    MaskUpdater(model, [reversed_batch(seed=2)]).update(torch.optim.SGD(model.parameters(), lr=0.1))
    assert not torch.equal(layer.speft_indices["default"], first)


@pytest.mark.parametrize("reset", ["new", "all"])
def test_reset_optimizer_modes(reset):
    model = speft_model(mask_update="dynamic", reset_optimizer=reset)
    salience_data = [batch(seed=1)]
    updater = MaskUpdater(model, salience_data)
    updater.calibrate()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch()).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    layers = sparse_layers(model)
    old = {name: (layer.speft_indices["default"].clone(),
                  {k: v.clone() for k, v in optimizer.state[layer.speft_values["default"]].items()})
           for name, layer in layers.items()}
    salience_data[:] = [reversed_batch(seed=3)]
    updater.update(optimizer)

    moved = 0
    for name, layer in layers.items():
        parameter = layer.speft_values["default"]
        state = optimizer.state.get(parameter, {})
        if parameter.numel() == 0:
            continue
        if reset == "all":
            assert state == {}
            continue
        old_indices, old_state = old[name]
        new_indices = layer.speft_indices["default"]
        assert torch.equal(state["step"], old_state["step"])
        for j, index in enumerate(new_indices.tolist()):
            hits = (old_indices == index).nonzero()
            for key in ("exp_avg", "exp_avg_sq"):
                expected = old_state[key][hits[0, 0]] if hits.numel() else torch.tensor(0.0)
                assert state[key][j] == expected
            moved += hits.numel() == 0
    if reset == "new":
        assert moved > 0
    # Training continues after the surgery.
    model(**batch()).loss.backward()
    optimizer.step()


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    settings = dict(max_steps=8, save_strategy="steps", save_steps=4)
    dynamic = dict(mask_update="dynamic", update_interval=3, salience_batches=2)
    full = speft_trainer(speft_model(**dynamic), tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files

    resumed = speft_trainer(speft_model(**dynamic), tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    full_losses, resumed_losses = step_losses(full), step_losses(resumed)
    assert sorted(resumed_losses) == list(range(1, 9))  # steps 1-4 come from the checkpoint's trainer state
    assert resumed_losses == full_losses
    for (full_indices, full_values), (indices, values) in zip(
        masks_and_values(full.model).values(), masks_and_values(resumed.model).values()
    ):
        assert torch.equal(full_indices, indices) and torch.equal(full_values, values)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    def final_values(**kwargs):
        trainer = speft_trainer(speft_model(salience="magnitude"), tmp_path, max_steps=4, learning_rate=1e-2,
                                optim="sgd", **kwargs)
        trainer.train()
        return torch.cat([v for _, v in masks_and_values(trainer.model).values()])

    accumulated = final_values(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    large = final_values(per_device_train_batch_size=4)
    assert accumulated.abs().sum() > 0
    torch.testing.assert_close(accumulated, large, atol=1e-6, rtol=1e-4)


def test_stock_trainer_with_speft_callback(tmp_path):
    model = speft_model(mask_update="dynamic", update_interval=2)
    salience_data = [batch(seed=1)]
    updater = MaskUpdater(model, salience_data)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=counting_dataset(),
                      data_collator=default_data_collator, callbacks=[SpeftCallback(updater)])
    with pytest.raises(RuntimeError, match="calibrate"):
        trainer.train()
    updater.calibrate()
    first = masks_and_values(model)
    salience_data[:] = [reversed_batch(seed=2)]  # updates see a different task, so the mask must move
    trainer.train()
    assert updater.pop_metrics()["speft/mask_churn"] > 0
    assert any(not torch.equal(first[name][0], indices) for name, (indices, _) in masks_and_values(model).items())


def test_calibration_dataset_and_errors(tmp_path):
    with pytest.raises(TypeError, match="SPEFT adapter"):
        hf_speft.SpeftTrainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=counting_dataset(),
                              data_collator=default_data_collator)
    trainer = hf_speft.SpeftTrainer(model=speft_model(), args=training_args(tmp_path, max_steps=1),
                                    data_collator=default_data_collator)
    with pytest.raises(ValueError, match="calibration_dataset"):
        trainer.train()
    # Calibrating on a different dataset than the one trained on gives that dataset's mask.
    reversed_rows = counting_dataset(seed=3).map(lambda row: {"input_ids": row["input_ids"][::-1],
                                                              "labels": row["labels"][::-1]})
    masks = []
    for calibration in (None, reversed_rows):
        model = speft_model()
        trainer = hf_speft.SpeftTrainer(model=model, args=training_args(tmp_path, max_steps=1),
                                        train_dataset=counting_dataset(), calibration_dataset=calibration,
                                        data_collator=default_data_collator)
        trainer.train()
        masks.append(torch.cat([i for i, _ in masks_and_values(model).values()]))
    assert not torch.equal(*masks)


def test_stock_evaluation_runs_during_training(tmp_path):
    model = speft_model()
    trainer = hf_speft.SpeftTrainer(model=model, args=training_args(tmp_path, max_steps=4, eval_strategy="steps",
                                                                    eval_steps=2),
                                    train_dataset=counting_dataset(), eval_dataset=counting_dataset(16, seed=7),
                                    data_collator=default_data_collator)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]  # training helps the held-out loss


def test_calibrated_static_adapter_builds_no_calibration_dataloader(tmp_path, monkeypatch):
    trainer = speft_trainer(speft_model(salience="magnitude"), tmp_path, max_steps=2)

    def unexpected():
        raise AssertionError("a calibrated static adapter needs no salience batches")

    monkeypatch.setattr(trainer, "get_calibration_dataloader", unexpected)
    trainer.train()
    assert trainer.state.global_step == 2


def test_grouped_dynamic_update_equals_one_pass():
    """A dynamic update scored in groups of layers moves the masks exactly as one pass over all layers does."""
    results = []
    for groups in (1, 2):
        model = speft_model(mask_update="dynamic", salience_groups=groups)
        salience_data = [batch(seed=1)]
        updater = MaskUpdater(model, salience_data, show_progress=False)
        updater.calibrate()
        salience_data[:] = [reversed_batch(seed=2)]
        churn = updater.update(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
        results.append((churn, {name: layer.speft_indices["default"] for name, layer in sparse_layers(model).items()}))
    assert results[0][0] == results[1][0] > 0
    for name, indices in results[0][1].items():
        assert torch.equal(results[1][1][name], indices)


def test_zero3_checkpointing_guard_sets_transformers_current_argument():
    """Under ZeRO-3 the trainer forces reentrant checkpointing; it must write `activation_checkpointing_kwargs`
    (what transformers reads), not only the deprecated `gradient_checkpointing_kwargs` alias."""
    import warnings
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from hf_speft.training.trainer import _gradient_checkpointing_guards

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current names raise no deprecation warning
        args = TrainingArguments("out", activation_checkpointing=True,
                                 activation_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True)
    object.__setattr__(args, "deepspeed_plugin", SimpleNamespace(zero_stage=3))
    model = speft_model()
    _gradient_checkpointing_guards(model, args)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}


def test_a_speft_run_at_a_lora_rate_logs_a_hint_once(tmp_path, caplog):
    """The hint's rate is the lowest SPEFT rate the sweeps chose (benchmarks/results/quality_sst2_sweep.json,
    quality_lm.json's gradient and magnitude salience), and docs/training.md quotes each sweep's SPEFT and LoRA
    rates."""
    import json
    import logging
    from pathlib import Path

    from hf_speft.training.callback import SPEFT_LEARNING_RATE, warn_about_a_low_learning_rate

    root = Path(__file__).parents[1]
    rates = json.loads((root / "benchmarks" / "results" / "quality_sst2_sweep.json").read_text())["learning_rates"]
    causal = json.loads((root / "benchmarks" / "results" / "quality_lm.json").read_text())["chosen_learning_rates"]
    assert SPEFT_LEARNING_RATE == min(rates["speft"], causal["speft-gradient"], causal["speft-magnitude"])
    training_doc = (root / "docs" / "training.md").read_text()
    assert f"`learning_rate={rates['speft']:g}`" in training_doc and f"LoRA's {rates['lora']:g}" in training_doc
    assert f"`learning_rate={causal['speft-gradient']:g}`" in training_doc
    assert f"LoRA's {causal['lora']:g}" in training_doc and f"magnitude salience {causal['speft-magnitude']:g}" \
        in training_doc
    warn_about_a_low_learning_rate.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hf_speft"):
        for _ in range(2):
            speft_trainer(speft_model(salience="magnitude"), tmp_path, max_steps=1, learning_rate=2e-5).train()
        assert caplog.text.count("SPEFT training starts with learning_rate=2e-05") == 1
        caplog.clear()
        speft_trainer(speft_model(salience="magnitude"), tmp_path, max_steps=1,
                      learning_rate=SPEFT_LEARNING_RATE / 2).train()
        assert "SPEFT training starts" not in caplog.text
