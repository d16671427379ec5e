"""bitsandbytes 8-bit and 4-bit bases on CPU: training, salience, save/load, merges. Real quantized layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from trainer_helpers import base_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_speft import SparsePeftConfig, calibrate, sparse_layers

pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt"), pytest.mark.filterwarnings("ignore:Merging a SPEFT")]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
QUANTIZATION = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    base_model().save_pretrained(folder)
    return folder


def quantized(checkpoint, bits):
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=QUANTIZATION[bits](),
                                                device_map="cpu")


def batch(seed=0):
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def masks(model):
    return {name: set(layer.speft_indices["default"].tolist()) for name, layer in sparse_layers(model).items()}


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_training_on_a_quantized_base(checkpoint, bits, tmp_path):
    model = get_peft_model(quantized(checkpoint, bits), SparsePeftConfig(
        target_modules=TARGETS, density=0.05, salience="gradient", salience_batches=2))
    calibrate(model, [batch(1), batch(2)], show_progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        name for name, _ in model.named_parameters() if "speft_values" in name}

    model.eval()
    inputs = {"input_ids": batch(3)["input_ids"]}
    with torch.no_grad():
        adapter_out = model(**inputs).logits
        with model.disable_adapter():
            base_out = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(quantized(checkpoint, bits), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapter_out)

        # Merge: dequantize, add, requantize (warned); the delta survives, unmerge restores the base exactly.
        with pytest.warns(UserWarning, match="requantizes"):
            model.merge_adapter()
        merged_out = model(**inputs).logits
        assert (merged_out - base_out).abs().max() > 0.1 * (adapter_out - base_out).abs().max()
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base_out)
        torch.testing.assert_close(model(**inputs).logits, adapter_out)


# Measured overlaps here: magnitude 100% (8-bit) / 80% (4-bit), gradient 99.6% / 91.8%.
@pytest.mark.parametrize(("measure", "bits", "minimum_overlap"), [
    ("magnitude", "8bit", 0.95), ("magnitude", "4bit", 0.75), ("gradient", "8bit", 0.95), ("gradient", "4bit", 0.85)])
def test_quantized_masks_agree_with_the_fp32_masks(checkpoint, measure, bits, minimum_overlap):
    config = dict(target_modules=TARGETS, density=0.05, salience=measure, salience_batches=2)
    full = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), SparsePeftConfig(**config))
    low_bit = get_peft_model(quantized(checkpoint, bits), SparsePeftConfig(**config))
    if measure == "gradient":
        for model in (full, low_bit):
            calibrate(model, [batch(1), batch(2)], show_progress=False)
    first, second = masks(full), masks(low_bit)
    total = sum(len(indices) for indices in first.values())
    overlap = sum(len(first[name] & second[name]) for name in first) / total
    assert overlap >= minimum_overlap, f"{measure}: only {overlap:.2%} of the fp32 mask is kept on the {bits} base"
    for layer in sparse_layers(low_bit).values():  # not a trivial pattern
        indices = layer.speft_indices["default"].long()
        if indices.numel() > 1:
            assert not torch.equal(indices, torch.arange(indices.numel()))
            assert len(set((indices // layer.in_features).tolist())) > 1


def test_synflow_refuses_quantized_weights(checkpoint):
    with warnings.catch_warnings(), pytest.raises(ValueError, match="quantized"):
        get_peft_model(quantized(checkpoint, "8bit"), SparsePeftConfig(target_modules=TARGETS, density=0.05,
                                                                       salience="synflow"))


def test_hybrid_adapter_on_an_8bit_base_merges_both_parts(checkpoint):
    """The low-rank part of hybrid mode is added by the quantized merge too; unmerge restores the base exactly."""
    model = get_peft_model(quantized(checkpoint, "8bit"), SparsePeftConfig(
        target_modules=TARGETS, match_lora_rank=4, lora_r=2, lora_alpha=64, salience="magnitude",
        init_weights=False)).eval()  # a large low-rank part, well above the requantization noise
    inputs = {"input_ids": batch(3)["input_ids"]}
    with torch.no_grad():
        adapter_out = model(**inputs).logits
        with model.disable_adapter():
            base_out = model(**inputs).logits
        with pytest.warns(UserWarning, match="requantizes"):
            model.merge_adapter()
        merged_out = model(**inputs).logits
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base_out)
        torch.testing.assert_close(model(**inputs).logits, adapter_out)
        for layer in sparse_layers(model).values():  # the sparse part alone
            layer.speft_lora_B["default"].zero_()
        sparse_only_out = model(**inputs).logits
    # Requantizing adds noise; the merged model is still nearer the whole adapter than its sparse part alone.
    assert (merged_out - adapter_out).abs().mean() < 0.5 * (merged_out - sparse_only_out).abs().mean()
