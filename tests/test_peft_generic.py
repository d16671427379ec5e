"""peft's generic tuner tests, run against SPEFT: every case of peft's `tests/testing_common.py` (`PeftCommonTester`)
that applies to a tuner of this kind, as `tests/test_custom_models.py` drives them, over the config cases × models of
`testing_common` (`CASES`, plus `QUANTIZED_CASES` where a check applies to 8-bit bases).

`PEFT_COMMON_CASES` is the one table of those cases: each `PeftCommonTester` method maps to the test here that runs its
checks, or to the reason it cannot apply; `test_every_peft_common_case_is_run_or_explained` holds the table to that. A
case peft adds is one line there. (peft's tests are not installed with peft, so its bodies are restated, not imported.)

What peft's bodies check that SPEFT once failed: every `low_cpu_mem_usage=True` load path (meta-device placeholders),
a config with only `target_modules`, trainable parameters with 0 elements under global masks, loading that ran
salience before throwing the result away, and a pickle save (`safe_serialization=False`) whose model card read the
safetensors file that such a save does not write.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import warnings

import pytest
import torch
from testing_common import (CASES, CONFIGS, MODELS, QUANTIZED_CASES, SPARSE_ONLY_CASES, TRANSFORMERS_CASES, base_for,
                            build, dense_reference, inputs_for, logits, make_config, make_model, tiny_llama,
                            with_case_state)
from peft import (AutoPeftModelForCausalLM, PeftModel, get_base_model_state_dict, get_peft_model,
                  get_peft_model_state_dict, inject_adapter_in_model, prepare_model_for_kbit_training,
                  set_base_model_state_dict)

import hf_speft
from hf_speft import SparsePeftConfig, SparsePeftLayer, sparse_layers
from hf_speft.hub import summarize_adapter

NOT_APPLICABLE = "n/a: "
# peft's PeftCommonTester method -> the test here that runs its checks, or "n/a: <why it cannot apply to SPEFT>".
PEFT_COMMON_CASES = {
    "_test_model_attr": "test_model_attributes_and_adapter_name",
    "_test_adapter_name": "test_model_attributes_and_adapter_name",
    "_test_prepare_for_training": "test_prepare_for_training",
    "_test_load_model_low_cpu_mem_usage": "test_load_model_low_cpu_mem_usage",
    "_test_save_pretrained": "test_save_pretrained",  # both formats
    "_test_save_pretrained_selected_adapters": "test_save_pretrained_selected_adapters",  # both formats
    "_test_save_pretrained_adapter_name_substring": "test_save_pretrained_adapter_name_substring",
    "_test_from_pretrained_config_construction": "test_from_pretrained_config_construction",
    "_test_load_multiple_adapters": "test_load_multiple_adapters",
    "_test_merge_layers_fp16": "test_merge_equals_unmerged_output",
    "_test_merge_layers_nan": "test_safe_merge_catches_nan",
    "_test_merge_layers": "test_merge_and_unload_matches_the_adapter",
    "_test_merge_layers_multi": "test_two_adapters_switch_merge_and_delete",
    "_test_merge_layers_is_idempotent": "test_merge_is_idempotent_and_unmerge_restores_the_base",
    "_test_safe_merge": "test_safe_merge_matches_merge",
    "_test_mixed_adapter_batches": "test_mixed_adapter_batch_matches_each_row_alone",
    "_test_generate_with_mixed_adapter_batches_and_beam_search": "test_generate",
    "_test_generate": "test_generate",
    "_test_generate_pos_args": "test_generate",
    "_test_generate_half_prec": "test_generate",
    "_test_training": "test_only_params_are_updated",
    "_test_inference_safetensors": "test_save_pretrained",
    "_test_training_layer_indexing": NOT_APPLICABLE + "SparsePeftConfig has no `layers_to_transform`; a layer subset "
                                                      "is chosen with `target_modules`",
    "_test_training_gradient_checkpointing": "test_no_grad_and_gradient_checkpointing",
    "_test_peft_model_device_map": "test_load_options",
    "_test_training_prompt_learning_tasks": NOT_APPLICABLE + "prompt-learning methods only",
    "_test_delete_adapter": "test_two_adapters_switch_merge_and_delete",
    "_test_delete_inactive_adapter": "test_delete_inactive_adapter_and_unload",
    "_test_delete_unknown_adapter_raises": "test_delete_unknown_adapter_raises",
    "_test_unload_adapter": "test_delete_inactive_adapter_and_unload",
    "_test_weighted_combination_of_adapters_lora": NOT_APPLICABLE + "`add_weighted_adapter` is LoRA's API; SPEFT "
                                                                    "adapters combine with `hf_speft.compose`",
    "_test_weighted_combination_of_adapters_ia3": NOT_APPLICABLE + "IA³'s weighted combination only",
    "_test_weighted_combination_of_adapters": NOT_APPLICABLE + "`add_weighted_adapter` is LoRA's and IA³'s API; SPEFT "
                                                               "adapters combine with `hf_speft.compose`",
    "_test_disable_adapter": "test_disable_adapter_gives_the_base_output",
    "_test_adding_multiple_adapters_with_bias_raises": NOT_APPLICABLE + "SparsePeftConfig has no `bias` option",
    "_test_passing_input_embeds_works": "test_passing_input_embeds_works",
    "_test_lora_conversion": NOT_APPLICABLE + "SPEFT layers keep peft's `supports_lora_conversion() == False` (peft's "
                                              "body returns early for such tuners)",
    "_test_get_base_model_state_dict": "test_get_base_model_state_dict",
}


def test_every_peft_common_case_is_run_or_explained():
    for case, how in PEFT_COMMON_CASES.items():
        assert how.startswith(NOT_APPLICABLE) or callable(globals().get(how)), f"{case}: no test named {how!r}"
        assert not how.startswith(NOT_APPLICABLE) or len(how) > len(NOT_APPLICABLE) + 10, f"{case}: no reason given"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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


@pytest.mark.parametrize(("config_name", "model_name"), CASES + QUANTIZED_CASES)
def test_only_params_are_updated(config_name, model_name):
    """peft `test_only_params_are_updated`: every adapter parameter changes in training, nothing else does."""
    model = make_model(config_name, model_name, init_weights=False)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert all(param.numel() > 0 for name, param in model.named_parameters() if param.requires_grad)
    trainable_steps(model, model_name)
    after = dict(model.named_parameters())  # a folded delta exists in the base weight only inside its GEMMs
    for name, value in before.items():
        if "speft_" in name or "modules_to_save" in name:
            assert not torch.allclose(value, after[name].detach()), f"{name} did not change"
        else:
            assert torch.equal(value, after[name].detach()), f"{name} changed"


@pytest.mark.parametrize(("config_name", "model_name"), CASES + QUANTIZED_CASES)
def test_parameters_after_loading_model(config_name, model_name, tmp_path):
    """peft `test_parameters_after_loading_model`: a trained adapter reloads to the same tensors and outputs."""
    model = make_model(config_name, model_name)
    trainable_steps(model, model_name)
    batch = inputs_for(model_name, seed=9)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_for(config_name, model_name), tmp_path).eval()
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
    with_case_state(model, config_name).save_pretrained(tmp_path)
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
    with_case_state(model, config_name)
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


@pytest.mark.parametrize(("config_name", "model_name"), CASES + QUANTIZED_CASES)
def test_mixed_adapter_batch_matches_each_row_alone(config_name, model_name):
    """peft `test_mixed_adapter_batches`: with `adapter_names=` every row goes through its own adapter (or none, for
    `"__base__"`), exactly as when that row runs alone with its adapter set. A mixed batch on a quantized base runs
    bitsandbytes' product plus each row's correction, so its rows alone are asked of that path, not the transient
    merge (a dequantized GEMM, which rounds differently from the int8 product)."""
    path = {"fold_weights": False} if (config_name, model_name) in QUANTIZED_CASES else {}
    model = make_model(config_name, model_name, init_weights=False, **path)
    model.add_adapter("other", make_config(config_name, model_name, init_weights=False, seed=1, **path))
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


# ------------------------------------------------------------------ the tuner's own checks, over the same matrix
@pytest.mark.parametrize(("config_name", "model_name"), CASES + QUANTIZED_CASES)
def test_forward_matches_the_dense_reference(config_name, model_name):
    """The adapter's output equals the base with its whole delta (mask, residual, low-rank part) added densely."""
    model = make_model(config_name, model_name, init_weights=False).eval()
    batch = inputs_for(model_name)
    tolerance = dict(atol=5e-2, rtol=5e-2) if config_name == "8bit" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, batch), logits(dense_reference(model), batch), **tolerance)


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_identity_at_init_and_nonzero_init_changes_output(config_name, model_name):
    batch = inputs_for(model_name)
    expected = logits(build(model_name), batch)
    torch.testing.assert_close(logits(make_model(config_name, model_name), batch), expected, rtol=0, atol=0)
    changed = logits(make_model(config_name, model_name, init_weights=False), batch)
    assert not torch.allclose(changed, expected, atol=1e-4)


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_trainable_count_matches_the_budget(config_name, model_name):
    model = make_model(config_name, model_name)
    layers = sparse_layers(model)
    shapes = [(layer.out_features, layer.in_features) for layer in layers.values()]
    nnz = sum(layer.speft_values["default"].numel() for layer in layers.values())
    low_rank = sum(p.numel() for n, p in model.named_parameters() if "speft_lora_" in n)
    assert nnz + low_rank == model.peft_config["default"].total_budget(shapes)
    assert all(layer.speft_values["default"].numel() >= 1 for layer in layers.values())
    trainable, _ = model.get_nb_trainable_parameters()
    extra = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "speft_" not in n)
    assert trainable == nnz + low_rank + extra
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_pickle_and_deepcopy(config_name, model_name):
    config = make_config(config_name, model_name)
    assert pickle.loads(pickle.dumps(config)) == config
    batch = inputs_for(model_name)
    model = make_model(config_name, model_name, init_weights=False)
    expected = logits(model, batch)
    torch.testing.assert_close(logits(pickle.loads(pickle.dumps(model)), batch), expected)
    torch.testing.assert_close(logits(copy.deepcopy(model), batch), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_merge_equals_unmerged_output(config_name, model_name, dtype):
    batch = inputs_for(model_name)
    model = make_model(config_name, model_name, init_weights=False).to(dtype)
    if "X" in batch:
        batch["X"] = batch["X"].to(dtype)
    unmerged = logits(model, batch)
    model.merge_adapter()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(logits(model, batch), unmerged, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_merge_is_idempotent_and_unmerge_restores_the_base(config_name, model_name):
    """Unmerge writes the replaced entries back (bit for bit); a low-rank part is subtracted, as LoRA's is."""
    base_state = {k: v.clone() for k, v in build(model_name).state_dict().items()}
    model = make_model(config_name, model_name, init_weights=False)
    model.merge_adapter()
    once = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert all(torch.equal(v, model.base_model.model.state_dict()[k]) for k, v in once.items())
    model.unmerge_adapter()
    unloaded = model.unload().state_dict()
    exact = not CONFIGS[config_name].get("lora_r")
    for key, value in base_state.items():
        if exact:
            assert torch.equal(unloaded[key], value), key
        else:
            torch.testing.assert_close(unloaded[key], value, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_merge_and_unload_matches_the_adapter(config_name, model_name):
    batch = inputs_for(model_name)
    model = make_model(config_name, model_name, init_weights=False)
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    assert not any(isinstance(module, SparsePeftLayer) for module in merged.modules())
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("config_name", "model_name"), SPARSE_ONLY_CASES)
def test_merged_weights_differ_only_at_the_delta_entries(config_name, model_name):
    base = build(model_name)
    model = make_model(config_name, model_name, init_weights=False)
    entries = {name.removeprefix("base_model.model."): layer.storage_positions(layer.delta_entries("default")[0])
               for name, layer in sparse_layers(model).items()}
    merged = model.merge_and_unload()
    changed_count = 0
    for name, positions in entries.items():
        before = base.get_submodule(name).weight.detach().reshape(-1)
        changed = torch.nonzero(merged.get_submodule(name).weight.detach().reshape(-1) != before).flatten()
        assert set(changed.tolist()) <= set(positions.tolist())
        changed_count += changed.numel()
    assert changed_count > 0


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_safe_merge_catches_nan(config_name, model_name):
    model = make_model(config_name, model_name, init_weights=False)
    layer = next(iter(sparse_layers(model).values()))
    with torch.no_grad():
        layer.speft_values["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_disable_adapter_gives_the_base_output(config_name, model_name):
    batch = inputs_for(model_name)
    expected = logits(build(model_name), batch)
    model = make_model(config_name, model_name, init_weights=False, modules_to_save=None)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
    assert not torch.allclose(logits(model, batch), expected)


@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_two_adapters_switch_merge_and_delete(config_name, model_name):
    batch = inputs_for(model_name)
    model = make_model(config_name, model_name, init_weights=False, modules_to_save=None)
    first = logits(model, batch)
    model.add_adapter("other", make_config(config_name, model_name, init_weights=False, seed=3, salience="random",
                                           modules_to_save=None))
    assert logits(model, batch).equal(first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model, batch)
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".other") for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), first)
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["other"])
    torch.testing.assert_close(logits(merged, batch), second, atol=1e-5, rtol=1e-5)
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    torch.testing.assert_close(logits(model, batch), second)
    assert all("default" not in layer.speft_values for layer in sparse_layers(model).values())


@pytest.mark.parametrize(("config_name", "model_name"), TRANSFORMERS_CASES)
def test_no_grad_and_gradient_checkpointing(config_name, model_name):
    batch = inputs_for(model_name)
    model = make_model(config_name, model_name, init_weights=False)
    with torch.no_grad():
        expected = logits(model, batch)
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(**batch).loss.backward()
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(logits(model, batch), expected)


@pytest.mark.parametrize("target_modules", ["all-linear", None])
def test_all_linear_and_architecture_default_targets(target_modules):
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=target_modules, density=0.05,
                                                          salience="magnitude"))
    names = {name.rsplit(".", 1)[-1] for name in sparse_layers(model)}
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert names == (expected if target_modules == "all-linear" else {"q_proj", "v_proj"})


# ------------------------------------------------------------------ peft's cases not covered above (PEFT_COMMON_CASES)
# Each config case once and each model once (the cheap subset for checks that do not depend on the combination).
ONE_EACH = [(config, "mlp") for config in CONFIGS] + [("local", model) for model in MODELS if model != "mlp"]
GENERATE_CASES = [(config, "llama") for config in CONFIGS] + [("local", "gpt2-conv1d"), ("local", "qwen2")]
FORMATS = pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])


def adapter_file(safe_serialization: bool) -> str:
    return "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"


def assert_same_adapter_state(model, loaded) -> None:
    saved, reloaded = model.state_dict(), loaded.state_dict()
    names = [name for name in saved if "speft_" in name or "modules_to_save" in name]
    assert names
    for name in names:
        torch.testing.assert_close(reloaded[name], saved[name], rtol=0, atol=0)


def assert_speft_card(folder, model, adapter_name: str = "default") -> None:
    """The folder's card has the SPEFT section, with the counts of the adapter in memory."""
    text = (folder / "README.md").read_text()
    nnz = sum(layer.speft_indices[adapter_name].numel() for layer in sparse_layers(model, adapter_name).values())
    assert text.count("## SPEFT adapter") == 1 and f"{nnz:,} trainable weights" in text


@pytest.mark.parametrize(("config_name", "model_name"), ONE_EACH)
def test_model_attributes_and_adapter_name(config_name, model_name):
    """peft `_test_model_attr` and `_test_adapter_name`."""
    model = get_peft_model(build(model_name), make_config(config_name, model_name), adapter_name="test-adapter")
    assert all(hasattr(model, name) for name in ("save_pretrained", "from_pretrained", "push_to_hub"))
    assert any("test-adapter" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(("config_name", "model_name"), GENERATE_CASES)
def test_prepare_for_training(config_name, model_name):
    """peft `_test_prepare_for_training`: embeddings need no grad until `enable_input_require_grads` (k-bit prep)."""
    ids = inputs_for(model_name)["input_ids"]
    model = get_peft_model(build(model_name), make_config(config_name, model_name))
    assert not model.get_input_embeddings()(ids).requires_grad
    base = prepare_model_for_kbit_training(build(model_name))
    assert not any(param.requires_grad for param in base.parameters())
    model = get_peft_model(base, make_config(config_name, model_name))
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(ids).requires_grad


@FORMATS
@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_save_pretrained(config_name, model_name, safe_serialization, tmp_path):
    """peft `_test_save_pretrained` (both formats) and `_test_inference_safetensors`: the files peft names and no
    others, a SPEFT card, and a reload without missing keys to the same tensors and outputs."""
    model = make_model(config_name, model_name, init_weights=False)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    assert {path.name for path in tmp_path.iterdir()} == {"README.md", "adapter_config.json",
                                                         adapter_file(safe_serialization)}
    assert_speft_card(tmp_path, model)
    assert summarize_adapter(str(tmp_path)).nnz == summarize_adapter(str(tmp_path)).nnz > 0  # readable either way
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base_for(config_name, model_name), tmp_path).eval()
    assert not any("missing adapter keys" in str(record.message) for record in records)
    assert_same_adapter_state(model, loaded)
    batch = inputs_for(model_name)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


@FORMATS
@pytest.mark.parametrize(("config_name", "model_name"), CASES)
def test_save_pretrained_selected_adapters(config_name, model_name, safe_serialization, tmp_path):
    """peft `_test_save_pretrained_selected_adapters` (both formats): a second adapter saves into its own subfolder
    with its own card, reloads with `load_adapter`, and `selected_adapters` saves only the ones named."""
    model = make_model(config_name, model_name, init_weights=False)
    model.add_adapter("new_adapter", make_config(config_name, model_name, init_weights=False, seed=1))
    model.save_pretrained(tmp_path / "all", safe_serialization=safe_serialization)
    for folder in (tmp_path / "all", tmp_path / "all" / "new_adapter"):
        assert (folder / adapter_file(safe_serialization)).is_file() and (folder / "adapter_config.json").is_file()
        assert not (folder / "config.json").exists() and not (folder / "model.safetensors").exists()
    assert_speft_card(tmp_path / "all", model)
    assert_speft_card(tmp_path / "all" / "new_adapter", model, "new_adapter")
    loaded = PeftModel.from_pretrained(base_for(config_name, model_name), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all" / "new_adapter", "new_adapter")
    assert model.state_dict().keys() == loaded.state_dict().keys()
    assert_same_adapter_state(model, loaded)

    model.save_pretrained(tmp_path / "one", selected_adapters=["new_adapter"], safe_serialization=safe_serialization)
    assert not (tmp_path / "one" / "adapter_config.json").exists()
    assert_speft_card(tmp_path / "one" / "new_adapter", model, "new_adapter")
    model.save_pretrained(tmp_path / "default", selected_adapters=["default"])
    assert list(PeftModel.from_pretrained(base_for(config_name, model_name), tmp_path / "default").peft_config) == [
        "default"]


@pytest.mark.parametrize(("config_name", "model_name"), ONE_EACH)
def test_save_pretrained_adapter_name_substring(config_name, model_name, tmp_path):
    """peft `_test_save_pretrained_adapter_name_substring`: adapters named like "default" stay out of its file."""
    from safetensors.torch import load_file

    model = make_model(config_name, model_name)
    expected = len(get_peft_model_state_dict(model))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_adapter(name, make_config(config_name, model_name))
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == expected


@pytest.mark.parametrize(("config_name", "model_name"), ONE_EACH)
def test_from_pretrained_config_construction(config_name, model_name, tmp_path):
    """peft `_test_from_pretrained_config_construction`: a config passed to `from_pretrained` is the one used."""
    make_model(config_name, model_name).save_pretrained(tmp_path)
    config = make_config(config_name, model_name)
    loaded = PeftModel.from_pretrained(base_for(config_name, model_name), tmp_path, is_trainable=False, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode


@pytest.mark.parametrize(("config_name", "model_name"), ONE_EACH)
def test_load_multiple_adapters(config_name, model_name, tmp_path):
    """peft `_test_load_multiple_adapters`: one folder loaded under three names, no missing keys."""
    make_model(config_name, model_name, init_weights=False).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(base_for(config_name, model_name), tmp_path, torch_device="cpu")
    for name in ("other", "yet-another"):
        assert model.load_adapter(tmp_path, adapter_name=name).missing_keys == []


@pytest.mark.parametrize(("config_name", "model_name"), ONE_EACH)
def test_load_options(config_name, model_name, tmp_path):
    """peft `_test_peft_model_device_map`, and `is_trainable` / `torch_device` of `from_pretrained`/`load_adapter`:
    inference-mode loads train nothing, trainable ones train the adapter's tensors."""
    model = make_model(config_name, model_name, init_weights=False)
    model.save_pretrained(tmp_path)
    batch = inputs_for(model_name)
    mapped = PeftModel.from_pretrained(base_for(config_name, model_name), tmp_path, device_map={"": "cpu"}).eval()
    torch.testing.assert_close(logits(mapped, batch), logits(model, batch), rtol=0, atol=0)
    assert not any(param.requires_grad for param in mapped.parameters())
    trainable = PeftModel.from_pretrained(base_for(config_name, model_name), tmp_path, is_trainable=True,
                                          torch_device="cpu")
    names = {name for name, param in trainable.named_parameters() if param.requires_grad}
    assert names and all("speft_" in name or "modules_to_save" in name for name in names)
    trainable.load_adapter(tmp_path, adapter_name="frozen", torch_device="cpu")
    assert not any(param.requires_grad for name, param in trainable.named_parameters() if ".frozen" in name)


@pytest.mark.parametrize(("config_name", "model_name"), ONE_EACH)
def test_safe_merge_matches_merge(config_name, model_name):
    """peft `_test_safe_merge`: `safe_merge=True` merges to the same weights and outputs as a plain merge."""
    batch = inputs_for(model_name)
    model = make_model(config_name, model_name, init_weights=False)
    expected = logits(model, batch)
    safe = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    plain = model.merge_and_unload()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(safe.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(logits(safe, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("config_name", "model_name"), GENERATE_CASES)
def test_generate(config_name, model_name):
    """peft `_test_generate`, `_test_generate_pos_args`, `_test_generate_half_prec` and
    `_test_generate_with_mixed_adapter_batches_and_beam_search`."""
    ids = inputs_for(model_name)["input_ids"]
    settings = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0}  # no early stop
    model = make_model(config_name, model_name, init_weights=False).eval()
    assert model.generate(input_ids=ids, **settings).shape == (len(ids), ids.shape[1] + 3)
    assert model.generate(ids, **settings).shape == (len(ids), ids.shape[1] + 3)  # positional input_ids
    model.add_adapter("other", make_config(config_name, model_name, init_weights=False, seed=1))
    names = ["default", "other", "__base__", "other"]
    mixed = model.generate(input_ids=ids, adapter_names=names, num_beams=2, **settings)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=ids[row:row + 1], num_beams=2, **settings)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[row:row + 1], num_beams=2, **settings)
        assert torch.equal(mixed[row:row + 1], alone), name
    for dtype in (torch.bfloat16, torch.float16):
        half = get_peft_model(build(model_name).to(dtype), make_config(config_name, model_name)).eval()
        with_case_state(half, config_name)
        assert half.generate(input_ids=ids, **settings).shape == (len(ids), ids.shape[1] + 3)


def test_delete_unknown_adapter_raises():
    """peft `_test_delete_unknown_adapter_raises`."""
    model = make_model("local", "mlp")
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")


@pytest.mark.parametrize(("config_name", "model_name"), GENERATE_CASES)
def test_passing_input_embeds_works(config_name, model_name):
    """peft `_test_passing_input_embeds_works`: `inputs_embeds` give the outputs of the ids they embed."""
    ids = inputs_for(model_name)["input_ids"]
    model = make_model(config_name, model_name, init_weights=False).eval()
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(("config_name", "model_name"), ONE_EACH)
def test_get_base_model_state_dict(config_name, model_name):
    """peft `_test_get_base_model_state_dict`: the base's own keys and values (folded deltas restored), and
    `set_base_model_state_dict` restores them after the base weights moved."""
    base = build(model_name)
    original = {key: value.clone() for key, value in base.state_dict().items()}
    model = make_model(config_name, model_name, init_weights=False)
    extracted = get_base_model_state_dict(model)
    assert extracted.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(extracted[key], value, rtol=0, atol=0)
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            if param.is_floating_point() and not param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    result = set_base_model_state_dict(model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in get_base_model_state_dict(model).items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)


# ------------------------------------------------------------------ saving, whatever the format or the failure
def test_a_failed_save_leaves_no_half_written_folder(tmp_path, monkeypatch):
    """A save that fails while peft writes leaves a new folder absent and an existing one as it was (with the files a
    user put there); a save that succeeds replaces only the adapter's files, and the other format's weights file."""
    import peft.peft_model

    model = make_model("local", "mlp", init_weights=False)
    model.save_pretrained(tmp_path / "kept")
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    before = {path.name: path.read_bytes() for path in (tmp_path / "kept").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    for folder in (tmp_path / "new", tmp_path / "kept"):
        with pytest.raises(OSError, match="No space left"):
            model.save_pretrained(folder)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        model.save_pretrained(tmp_path / "kept" / "notes.txt")
    assert {path.name: path.read_bytes() for path in (tmp_path / "kept").iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept"]  # no staging folder left behind
    monkeypatch.undo()

    model.save_pretrained(tmp_path / "kept", safe_serialization=False)
    assert {path.name for path in (tmp_path / "kept").iterdir()} == {"README.md", "adapter_config.json",
                                                                    "adapter_model.bin", "notes.txt"}
    loaded = PeftModel.from_pretrained(build("mlp"), tmp_path / "kept")  # the new weights, not a stale file
    assert_same_adapter_state(model, loaded)


def test_trainer_checkpoints_carry_the_adapter_and_its_card(tmp_path):
    """Trainer checkpoints save through `save_pretrained`, in the format the installed transformers offers: with
    `save_safetensors=False` where it still has that argument (transformers 5 dropped it and always writes
    safetensors; a pickle save is then `save_pretrained(safe_serialization=False)`, tested above)."""
    from trainer_helpers import speft_model, speft_trainer
    from transformers import TrainingArguments

    pickle_option = "save_safetensors" in {field.name for field in dataclasses.fields(TrainingArguments)}
    trainer = speft_trainer(speft_model(), tmp_path, max_steps=2, save_steps=1, save_strategy="steps",
                            **({"save_safetensors": False} if pickle_option else {}))
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / adapter_file(safe_serialization=not pickle_option)).is_file()
    assert_speft_card(checkpoint, trainer.model)
    loaded = PeftModel.from_pretrained(build("llama"), checkpoint)
    assert_same_adapter_state(trainer.model, loaded)


# ------------------------------------------------------------------ copies
@pytest.mark.parametrize("config_name", ["local", "hybrid", "fold", "residual"])
def test_deepcopy_after_backward_trains_independently(config_name):
    """A model copied after a backward pass (its cached mask layouts and kernel state built) runs and trains on its
    own tensors: a step on the copy leaves the original as it was, and the same step on the original then gives the
    copy's result."""
    batch = inputs_for("llama")
    model = make_model(config_name, "llama", init_weights=False)
    model.train()
    model(**batch).loss.backward()
    model.zero_grad()
    clone = copy.deepcopy(model)
    for name, layer in sparse_layers(clone).items():
        original = sparse_layers(model)[name]
        for key, pattern in layer._patterns.items():
            assert pattern.indices.data_ptr() != original._patterns[key].indices.data_ptr()
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}

    def step(peft_model) -> torch.Tensor:
        optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
        peft_model.train()
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return logits(peft_model.eval(), batch)

    trained_clone = step(clone)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.detach(), before[name]), name
    assert not torch.allclose(trained_clone, logits(model.eval(), batch))
    torch.testing.assert_close(step(model), trained_clone)
