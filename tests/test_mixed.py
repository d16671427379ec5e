"""SPEFT adapters in peft's mixed models, beside LoRA: forward against a dense reference, merging, calibration with
the LoRA active, loading saved adapters into a mixed model, and a SPEFT adapter trained on top of a frozen LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from testing_common import tiny_llama
from peft import LoraConfig, PeftMixedModel, PeftModel, get_peft_model

from hf_speft import SparsePeftConfig, calibrate, save_mixed_adapter, sparse_layers

LORA_TARGETS = ["q_proj", "v_proj"]
SPEFT_TARGETS = ["q_proj", "down_proj"]  # q_proj carries both adapters


def base_model():
    torch.manual_seed(0)
    return tiny_llama().eval()


def mixed_model(salience="magnitude"):
    model = get_peft_model(base_model(), LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False),
                           mixed=True)
    model.add_adapter("sparse", SparsePeftConfig(target_modules=SPEFT_TARGETS, density=0.05, salience=salience,
                                                  init_weights=False))
    model.set_adapter(["default", "sparse"])
    return model.eval()


def inputs(seed=0):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def dense_reference(model, adapters):
    """The base with every active adapter's delta added to its dense weights."""
    reference = base_model()
    weights = dict(reference.named_parameters())
    for name, module in model.named_modules():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
        if "lora" in adapters and hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            weights[key].data += delta.detach()
        if "sparse" in adapters and name in sparse_layers(model, "sparse"):
            indices, values = module.delta_entries("sparse")
            weights[key].data.view(-1)[indices.long()] += values.detach()
    return reference


def test_mixed_lora_and_speft_forward_matches_the_dense_reference():
    model = mixed_model()
    assert type(model.base_model).__name__ == "SpeftMixedModel"
    both = model(input_ids=inputs()).logits
    torch.testing.assert_close(both, dense_reference(model, {"lora", "sparse"})(input_ids=inputs()).logits)
    model.set_adapter("sparse")
    torch.testing.assert_close(model(input_ids=inputs()).logits,
                               dense_reference(model, {"sparse"})(input_ids=inputs()).logits)
    model.set_adapter(["default", "sparse"])
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=inputs()).logits, base_model()(input_ids=inputs()).logits)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=inputs()).logits, both, atol=1e-5, rtol=1e-5)


def test_trainable_parameters_are_both_adapters():
    trainable = [name for name, p in mixed_model().named_parameters() if p.requires_grad]
    assert any("lora_A.default" in name for name in trainable) and any("speft_values.sparse" in name
                                                                       for name in trainable)
    assert all("lora_" in name or "speft_values" in name for name in trainable)


def test_calibrate_a_speft_adapter_with_the_lora_active():
    model = mixed_model(salience="gradient")
    batch = {"input_ids": inputs(), "labels": inputs()}
    counts = calibrate(model, [batch], adapter_name="sparse", show_progress=False)
    total = sum(layer.out_features * layer.in_features for layer in sparse_layers(model, "sparse").values())
    assert sum(counts.values()) == round(0.05 * total)
    model.train()
    model(**batch).loss.backward()  # both adapters train


def test_speft_on_top_of_a_frozen_published_lora(tmp_path):
    """Load a saved LoRA into a mixed model, add a SPEFT adapter, train it alone, save only it, reload both."""
    lora = get_peft_model(base_model(), LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    model = PeftMixedModel.from_pretrained(base_model(), tmp_path / "lora", adapter_name="lora")
    model.add_adapter("sparse", SparsePeftConfig(target_modules=SPEFT_TARGETS, density=0.05, salience="gradient"))
    model.set_adapter(["lora", "sparse"])
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("speft_values" in name)  # the published LoRA stays frozen
    batch = {"input_ids": inputs(), "labels": inputs()}
    calibrate(model, [batch], adapter_name="sparse", show_progress=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("speft_values.sparse" in name for name in changed)

    save_mixed_adapter(model, "sparse", str(tmp_path / "sparse"))
    saved = PeftModel.from_pretrained(base_model(), tmp_path / "sparse")
    assert all("lora" not in name for name, _ in saved.named_parameters())  # only the sparse adapter was saved
    reloaded = PeftMixedModel.from_pretrained(base_model(), tmp_path / "lora", adapter_name="lora")
    reloaded.load_adapter(tmp_path / "sparse", adapter_name="sparse")
    reloaded.set_adapter(["lora", "sparse"])
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(input_ids=inputs(1)).logits, model(input_ids=inputs(1)).logits)
    with pytest.raises(ValueError, match="No adapter named 'missing'"):
        save_mixed_adapter(model, "missing", str(tmp_path / "x"))


def test_plain_speft_tuner_is_unchanged_by_mixed_support():
    model = get_peft_model(base_model(), SparsePeftConfig(target_modules=SPEFT_TARGETS, density=0.05,
                                                          salience="magnitude"))
    assert type(model.base_model).__name__ == "SparsePeftModel"
    copy.deepcopy(model)(input_ids=inputs())
