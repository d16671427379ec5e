"""peft's generic tuner tests, run against SPEFT: the bodies of peft's `tests/testing_common.py` (`PeftCommonTester`)
as `tests/test_custom_models.py` drives them, with our configs. Each case is (config name, model name).

What peft's bodies check that SPEFT once failed: every `low_cpu_mem_usage=True` load path (meta-device placeholders),
a config with only `target_modules`, trainable parameters with 0 elements under global masks, and loading that ran
salience before throwing the result away.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import MODELS, build, inputs_for, logits, tiny_llama
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model, inject_adapter_in_model

import hf_speft
from hf_speft import SparsePeftConfig, sparse_layers

# Our configs, in peft's (name, kwargs) form; every one is data-free, so get_peft_model returns a trainable adapter.
CONFIGS = {
    "defaults": {},  # target_modules alone (the budget defaults to a rank-8 LoRA's)
    "global-tight": {"num_params": 40, "mask_scope": "global"},  # a budget that once left layers with no entry
    "local": {"density": 0.05, "mask_scope": "local"},
    "random": {"density": 0.05, "salience": "random"},
    "hybrid": {"match_lora_rank": 4, "lora_r": 1},
    "fold": {"density": 0.05, "fold_weights": True},
}
CASES = [(config, model) for config in CONFIGS for model in MODELS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_config(config_name: str, model_name: str, **overrides) -> SparsePeftConfig:
    _, targets, to_save = MODELS[model_name]
    kwargs = {"target_modules": targets, "modules_to_save": to_save, "salience": "magnitude",
              **CONFIGS[config_name], **overrides}
    return SparsePeftConfig(**kwargs)


def make_model(config_name: str, model_name: str, **overrides):
    return get_peft_model(build(model_name), make_config(config_name, model_name, **overrides))


def trainable_steps(model, model_name: str, steps: int = 3, lr: float = 0.1) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        batch = inputs_for(model_name, seed=step)
        output = model(**batch)
        loss = output["loss"] if isinstance(output, dict) else output.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_only_params_are_updated(config_name, model_name):
    """peft `test_only_params_are_updated`: every adapter parameter changes in training, nothing else does."""
    model = make_model(config_name, model_name, init_weights=False)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert all(param.numel() > 0 for name, param in model.named_parameters() if param.requires_grad)
    trainable_steps(model, model_name)
    # fold_weights keeps the delta written into the base weight while training; state_dict() restores the base.
    after = model.state_dict(keep_vars=True) if CONFIGS[config_name].get("fold_weights") else dict(
        model.named_parameters())
    for name, value in before.items():
        if "speft_" in name or "modules_to_save" in name:
            assert not torch.allclose(value, after[name].detach()), f"{name} did not change"
        else:
            assert torch.equal(value, after[name].detach()), f"{name} changed"


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_parameters_after_loading_model(config_name, model_name, tmp_path):
    """peft `test_parameters_after_loading_model`: a trained adapter reloads to the same tensors and outputs."""
    model = make_model(config_name, model_name)
    trainable_steps(model, model_name)
    batch = inputs_for(model_name, seed=9)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(model_name), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, batch), expected)
    saved = {name: value for name, value in model.state_dict().items() if "speft_" in name}
    reloaded = loaded.state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_load_model_low_cpu_mem_usage(config_name, model_name, dtype, autocast_adapter_dtype, tmp_path):
    """peft `_test_load_model_low_cpu_mem_usage`: `from_pretrained` and `load_adapter` with low_cpu_mem_usage=True
    leave no meta tensor and give the adapter's outputs; `inject_adapter_in_model` leaves meta placeholders."""
    model = get_peft_model(build(model_name).to(dtype), make_config(config_name, model_name, init_weights=False),
                           autocast_adapter_dtype=autocast_adapter_dtype)
    model.save_pretrained(tmp_path)
    batch = inputs_for(model_name, seed=9)
    if "X" in batch:
        batch["X"] = batch["X"].to(dtype)
    reference = PeftModel.from_pretrained(build(model_name).to(dtype), tmp_path,
                                          autocast_adapter_dtype=autocast_adapter_dtype).eval()
    expected = logits(reference, batch)

    loaded = PeftModel.from_pretrained(build(model_name).to(dtype), tmp_path, low_cpu_mem_usage=True,
                                       autocast_adapter_dtype=autocast_adapter_dtype).eval()
    assert {param.device.type for param in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(loaded, batch), expected)
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True,
                        autocast_adapter_dtype=autocast_adapter_dtype)
    assert {param.device.type for param in loaded.parameters()} == {"cpu"}
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, batch), expected)
    for name, layer in sparse_layers(loaded).items():
        assert torch.equal(layer.speft_indices["other"], layer.speft_indices["default"]), name
    # the adapter tensors keep the dtypes a regular load gives them (autocast_adapter_dtype applies alike)
    reference_dtypes = {name: param.dtype for name, param in reference.named_parameters() if "speft_" in name}
    loaded_dtypes = {name: param.dtype for name, param in loaded.named_parameters() if name in reference_dtypes}
    assert reference_dtypes and loaded_dtypes == reference_dtypes

    injected = inject_adapter_in_model(make_config(config_name, model_name), build(model_name),
                                       low_cpu_mem_usage=True)
    assert "meta" in {param.device.type for param in injected.parameters()}


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_auto_peft_model_low_cpu_mem_usage(low_cpu_mem_usage, tmp_path):
    """peft's AutoPeftModel path, from a saved base and adapter folder."""
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    model = make_model("local", "llama", init_weights=False)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    batch = inputs_for("llama")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
    assert {param.device.type for param in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(loaded.eval(), batch), logits(model, batch))


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_does_no_salience_work(low_cpu_mem_usage, tmp_path, monkeypatch):
    """Loading takes the saved masks: no measure runs, not even the data-free one the config names."""
    model = make_model("global-tight", "llama", init_weights=False)
    model.save_pretrained(tmp_path)
    batch = inputs_for("llama")
    expected = logits(model, batch)

    def refuse(*args, **kwargs):
        raise AssertionError("a salience measure ran while loading a saved adapter")

    magnitude = hf_speft.measures.get_measure("magnitude")
    monkeypatch.setitem(hf_speft.measures._MEASURES, "magnitude", dataclasses.replace(magnitude, fn=refuse))
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=low_cpu_mem_usage)
    torch.testing.assert_close(logits(loaded.eval(), batch), expected)
    with pytest.raises(AssertionError, match="salience measure ran"):  # a new adapter still builds its mask
        get_peft_model(build("llama"), make_config("global-tight", "llama"))


def test_a_loaded_config_injected_without_a_checkpoint_asks_for_calibration(tmp_path):
    make_model("local", "llama").save_pretrained(tmp_path)
    model = get_peft_model(build("llama"), SparsePeftConfig.from_pretrained(tmp_path))
    with pytest.raises(RuntimeError, match="has no mask yet"):
        model.save_pretrained(tmp_path / "again")
    hf_speft.calibrate(model)  # data-free: no dataloader needed
    assert all(layer.speft_values["default"].numel() > 0 for layer in sparse_layers(model).values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_forward_half_precision(config_name, model_name, dtype):
    """peft `test_forward_float16` / `test_forward_bfloat16`: a half-precision base runs and gives finite outputs."""
    model = get_peft_model(build(model_name).to(dtype), make_config(config_name, model_name, init_weights=False))
    batch = inputs_for(model_name)
    if "X" in batch:
        batch["X"] = batch["X"].to(dtype)
    output = logits(model, batch)
    assert torch.isfinite(output).all()


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_disable_adapters_with_merging(config_name, model_name):
    """peft `test_disable_adapters_with_merging`: merged, the adapter gives its output; disabled, the base's."""
    model = make_model(config_name, model_name, init_weights=False)
    batch = inputs_for(model_name)
    base = logits(build(model_name), batch) if not MODELS[model_name][2] else None
    unmerged = logits(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), unmerged, atol=2e-4, rtol=1e-4)
    with model.disable_adapter():
        disabled = logits(model, batch)
    if base is not None:  # modules_to_save stay active when disabled in peft, so only compare without them
        torch.testing.assert_close(disabled, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_delete_inactive_adapter_and_unload(config_name, model_name):
    """peft `test_delete_inactive_adapter` and `test_unload_adapter`."""
    model = make_model(config_name, model_name, init_weights=False)
    batch = inputs_for(model_name)
    expected = logits(model, batch)
    model.add_adapter("other", make_config(config_name, model_name, init_weights=False, seed=1))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert not any("other" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), expected)
    base = build(model_name)
    unloaded = copy.deepcopy(model).unload()
    for name, value in base.state_dict().items():
        assert torch.equal(unloaded.state_dict()[name], value), name


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_mixed_adapter_batch_matches_each_row_alone(config_name, model_name):
    """peft `test_mixed_adapter_batches`: with `adapter_names=` every row goes through its own adapter (or none, for
    `"__base__"`), exactly as when that row runs alone with its adapter set."""
    model = make_model(config_name, model_name, init_weights=False)
    model.add_adapter("other", make_config(config_name, model_name, init_weights=False, seed=1))
    model.eval()  # mixed batches are for inference, as in peft
    inputs = {key: value for key, value in inputs_for(model_name).items() if key != "labels"}
    names = ["default", "other", "__base__", "other"]
    mixed = logits(model, {**inputs, "adapter_names": names})
    for row, name in enumerate(names):
        alone = {key: value[row:row + 1] for key, value in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected = logits(model, alone)
        else:
            model.set_adapter(name)
            expected = logits(model, alone)
        torch.testing.assert_close(mixed[row:row + 1], expected, atol=1e-5, rtol=1e-5)
    model.set_adapter("default")
    assert not torch.allclose(mixed[1], logits(model, inputs)[1], atol=1e-4)  # "other" really differs there
