"""peft-style conformance checks of the SPEFT tuner over several module kinds (Linear MLP, GPT-2 Conv1D, Llama,
Qwen2)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import MODELS, build, inputs_for, logits
from peft import PeftModel, get_peft_model

from hf_speft import SparsePeftConfig, SparsePeftLayer, sparse_layers


def speft_config(name: str, **kwargs) -> SparsePeftConfig:
    _, targets, to_save = MODELS[name]
    defaults = dict(target_modules=targets, modules_to_save=to_save, density=0.05, salience="magnitude")
    defaults.update(kwargs)
    return SparsePeftConfig(**defaults)


def peft_model(name: str, **kwargs):
    return get_peft_model(build(name), speft_config(name, **kwargs))


def test_identity_at_init(model_name):
    batch = inputs_for(model_name)
    expected = logits(build(model_name), batch)
    model = peft_model(model_name)
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


def test_nonzero_init_changes_output(model_name):
    batch = inputs_for(model_name)
    expected = logits(build(model_name), batch)
    model = peft_model(model_name, init_weights=False)
    assert not torch.allclose(logits(model, batch), expected, atol=1e-4)


def test_trainable_count_matches_budget(model_name):
    model = peft_model(model_name, mask_scope="global")
    layers = sparse_layers(model)
    total = sum(layer.out_features * layer.in_features for layer in layers.values())
    nnz = sum(layer.speft_values["default"].numel() for layer in layers.values())
    assert nnz == round(0.05 * total)
    trainable, _ = model.get_nb_trainable_parameters()
    extra = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "speft_" not in n)
    assert trainable == nnz + extra
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_save_load_round_trip(model_name, tmp_path):
    batch = inputs_for(model_name)
    model = peft_model(model_name, init_weights=False)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(build(model_name), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected)
    for name, layer in sparse_layers(model).items():
        other = sparse_layers(loaded)[name]
        assert torch.equal(layer.speft_indices["default"], other.speft_indices["default"])


def test_pickle_config_and_model(model_name):
    config = speft_config(model_name)
    assert pickle.loads(pickle.dumps(config)) == config
    batch = inputs_for(model_name)
    model = peft_model(model_name, init_weights=False)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(logits(clone, batch), logits(model, batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_equals_unmerged_output(model_name, dtype):
    batch = inputs_for(model_name)
    model = peft_model(model_name, init_weights=False).to(dtype)
    if "X" in batch:
        batch["X"] = batch["X"].to(dtype)
    unmerged = logits(model, batch)
    model.merge_adapter()
    merged = logits(model, batch)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(merged, unmerged, atol=tolerance, rtol=tolerance)


def test_merge_idempotent_and_unmerge_restores_base(model_name):
    base_state = {k: v.clone() for k, v in build(model_name).state_dict().items()}
    model = peft_model(model_name, init_weights=False)
    model.merge_adapter()
    once = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert all(torch.equal(v, model.base_model.model.state_dict()[k]) for k, v in once.items())
    model.unmerge_adapter()
    unloaded = model.unload().state_dict()
    for key, value in base_state.items():
        assert torch.equal(unloaded[key], value), key


def test_merge_and_unload_matches_adapter_output(model_name):
    batch = inputs_for(model_name)
    model = peft_model(model_name, init_weights=False)
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SparsePeftLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=1e-5)


def test_merged_weights_differ_only_at_mask(model_name):
    base = build(model_name)
    model = peft_model(model_name, init_weights=False)
    masks = {name.removeprefix("base_model.model."): layer.storage_positions(layer.speft_indices["default"])
             for name, layer in sparse_layers(model).items()}
    merged = model.merge_and_unload()
    num_changed = 0
    for name, positions in masks.items():
        before = base.get_submodule(name).weight.detach().reshape(-1)
        after = merged.get_submodule(name).weight.detach().reshape(-1)
        changed = torch.nonzero(after != before).flatten()
        assert set(changed.tolist()) <= set(positions.tolist())
        num_changed += changed.numel()
    assert num_changed > 0


def test_safe_merge_catches_nan(model_name):
    model = peft_model(model_name, init_weights=False)
    layer = next(iter(sparse_layers(model).values()))
    with torch.no_grad():
        layer.speft_values["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


def test_disable_adapter_gives_base_output(model_name):
    batch = inputs_for(model_name)
    expected = logits(build(model_name), batch)
    model = peft_model(model_name, init_weights=False, modules_to_save=None)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
    assert not torch.allclose(logits(model, batch), expected)


def test_two_adapters_switch_and_delete(model_name):
    batch = inputs_for(model_name)
    model = peft_model(model_name, init_weights=False, modules_to_save=None)
    first = logits(model, batch)
    model.add_adapter("other", speft_config(model_name, init_weights=False, seed=3, salience="random",
                                            modules_to_save=None))
    assert logits(model, batch).equal(first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model, batch)
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".other") for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), first)
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    torch.testing.assert_close(logits(model, batch), second)
    assert all("default" not in layer.speft_values for layer in sparse_layers(model).values())


def test_merge_selected_adapter_names(model_name):
    batch = inputs_for(model_name)
    model = peft_model(model_name, init_weights=False, modules_to_save=None)
    model.add_adapter("other", speft_config(model_name, init_weights=False, seed=3, salience="random",
                                            modules_to_save=None))
    model.set_adapter("other")
    expected = logits(model, batch)
    merged = model.merge_and_unload(adapter_names=["other"])
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=1e-5)


def test_training_changes_only_values_and_modules_to_save(model_name):
    model = peft_model(model_name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        out = model(**inputs_for(model_name, seed=step))
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    assert all(".speft_values." in n or "modules_to_save" in n for n in changed), changed
    assert any(".speft_values." in n for n in changed)


@pytest.mark.parametrize("model_name", ["gpt2-conv1d", "llama", "qwen2"])
def test_no_grad_and_gradient_checkpointing(model_name):
    batch = inputs_for(model_name)
    model = peft_model(model_name, init_weights=False)
    with torch.no_grad():
        expected = logits(model, batch)
    model.train()
    loss_plain = model(**batch).loss
    loss_plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(**batch).loss.backward()
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(logits(model, batch), expected)


def test_deepcopy_keeps_masks(model_name):
    model = peft_model(model_name, init_weights=False)
    clone = copy.deepcopy(model)
    batch = inputs_for(model_name)
    torch.testing.assert_close(logits(clone, batch), logits(model, batch))


@pytest.mark.parametrize("target_modules", ["all-linear", None])
def test_all_linear_and_architecture_default_targets(target_modules):
    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=target_modules, density=0.05,
                                                          salience="magnitude"))
    names = {name.rsplit(".", 1)[-1] for name in sparse_layers(model)}
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert names == (expected if target_modules == "all-linear" else {"q_proj", "v_proj"})
