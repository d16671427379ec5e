"""Saved adapters: they load without the salience measure they were trained with, and whether an injection builds a
mask is stated by the config (`saved_masks`), the same whatever ran before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from testing_common import tiny_llama
from transformers import AutoModelForCausalLM

from hf_speft import SparsePeftConfig, register_salience, sparse_layers

TARGETS = ["q_proj", "v_proj"]
REPO = Path(__file__).parents[1]
CALLS: list[str] = []


def row_index(ctx):
    """A custom data-free measure (higher rows rank first) that counts its calls."""
    CALLS.append("row_index")
    return {name: torch.arange(layer.out_features, dtype=torch.float32)[:, None].expand(-1, layer.in_features)
            for name, layer in ctx.layers.items()}


register_salience("test_row_index", row_index, data_free=True, runs_model=False, overwrite=True)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A base model folder and a custom-measure adapter saved for it (random nonzero values)."""
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), SparsePeftConfig(
        target_modules=TARGETS, density=0.1, salience="test_row_index", init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    inputs = torch.arange(12).view(2, 6)
    with torch.no_grad():
        torch.save({"input_ids": inputs, "logits": model(input_ids=inputs).logits}, tmp_path / "expected.pt")
    return tmp_path


def test_a_custom_measure_adapter_loads_where_the_measure_is_not_registered(saved):
    script = textwrap.dedent(f"""
        import torch
        import hf_speft
        from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
        from transformers import AutoModelForCausalLM

        assert "test_row_index" not in hf_speft.available_measures()
        folder = {str(saved)!r}
        expected = torch.load(folder + "/expected.pt")
        config = PeftConfig.from_pretrained(folder + "/adapter")
        assert config.salience == "test_row_index" and config.saved_masks
        base = lambda: AutoModelForCausalLM.from_pretrained(folder + "/base")
        models = [PeftModel.from_pretrained(base(), folder + "/adapter"),
                  AutoPeftModelForCausalLM.from_pretrained(folder + "/adapter"),
                  PeftModel.from_pretrained(base(), folder + "/adapter", config=config)]
        for model in models:
            with torch.no_grad():
                torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits, expected["logits"])
        print("loaded", len(models))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded 3" in result.stdout


def test_whether_injection_builds_a_mask_does_not_depend_on_call_order(saved):
    """A loaded config injects without salience every time (before: only the first injection skipped it)."""
    base = lambda: AutoModelForCausalLM.from_pretrained(saved / "base")  # noqa: E731
    CALLS.clear()
    config = SparsePeftConfig.from_pretrained(saved / "adapter")
    first, second = get_peft_model(base(), config), get_peft_model(base(), config)
    assert CALLS == []
    for model in (first, second):  # no checkpoint: uncalibrated until calibrate runs
        assert all(layer.speft_uncalibrated == {"default"} for layer in sparse_layers(model).values())
    loaded = PeftModel.from_pretrained(base(), saved / "adapter", config=config)
    auto = AutoPeftModelForCausalLM.from_pretrained(saved / "adapter")
    assert CALLS == []  # the checkpoint's masks, no salience
    expected = torch.load(saved / "expected.pt")
    with torch.no_grad():
        for model in (loaded, auto):
            torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits, expected["logits"])
    fresh = get_peft_model(base(), SparsePeftConfig(target_modules=TARGETS, density=0.1, salience="test_row_index"))
    assert CALLS == ["row_index"] and not fresh.peft_config["default"].saved_masks


def test_saving_writes_saved_masks_without_changing_the_config_in_memory(saved, tmp_path):
    assert json.loads((saved / "adapter" / "adapter_config.json").read_text())["saved_masks"] is True
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, density=0.1, salience="random"))
    model.save_pretrained(tmp_path / "again")
    assert model.peft_config["default"].saved_masks is False
    assert PeftConfig.from_pretrained(tmp_path / "again").saved_masks is True


@pytest.fixture
def unreadable_adapter_files(monkeypatch):
    """Any read of a safetensors file fails (the save must build its card from the model in memory)."""
    import safetensors
    import safetensors.torch

    import hf_speft.checkpoint
    import hf_speft.hub

    def refuse(*args, **kwargs):
        raise AssertionError("a save read an adapter file back")

    for module, name in ((hf_speft.checkpoint, "read_weights"), (hf_speft.hub, "read_weights"),
                         (safetensors.torch, "load_file"), (safetensors, "safe_open"),
                         (safetensors.torch, "safe_open")):
        monkeypatch.setattr(module, name, refuse)


def test_the_card_is_written_from_memory_and_matches_the_saved_files(tmp_path, unreadable_adapter_files,
                                                                      monkeypatch):
    from hf_speft.hub import CARD_START

    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, density=0.1, salience="random",
                                                          lora_r=1, init_weights=False))
    model.add_adapter("other", SparsePeftConfig(target_modules=["q_proj"], num_params=40, salience="magnitude"))
    model.save_pretrained(tmp_path / "saved")
    cards = {folder: (tmp_path / "saved" / folder / "README.md").read_text() for folder in ("", "other")}
    assert all(CARD_START in card for card in cards.values())
    assert "| budget | `num_params=40` → 40 trainable weights |" in cards["other"]
    monkeypatch.undo()  # the same card, built by reading the saved folder
    from hf_speft.hub import update_model_card

    for folder, card in cards.items():
        update_model_card(str(tmp_path / "saved" / folder))
        assert (tmp_path / "saved" / folder / "README.md").read_text() == card


def test_trainer_checkpoints_carry_the_card_without_reading_the_adapter_back(tmp_path, unreadable_adapter_files):
    from trainer_helpers import speft_model, speft_trainer

    from hf_speft.hub import CARD_START

    trainer = speft_trainer(speft_model(salience="magnitude"), tmp_path / "out", max_steps=2, save_strategy="steps",
                            save_steps=1)
    trainer.train()
    for step in (1, 2):
        card = (tmp_path / "out" / f"checkpoint-{step}" / "README.md").read_text()
        assert CARD_START in card and "salience measure | `magnitude`" in card
