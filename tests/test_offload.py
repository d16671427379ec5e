"""accelerate's big-model paths give a SPEFT model the outputs it has without them, as they do for LoRA: `cpu_offload`,
`disk_offload`, `dispatch_model` with layers on disk, and a base loaded with `from_pretrained(device_map=...,
offload_folder=...)` under `PeftModel.from_pretrained`. All on CPU (the execution device), tiny models.

SPEFT's trainable tensors live in `nn.ParameterDict`s that accelerate hooks like any module holding tensors; the layer
reads them by calling the dict (`layer.ForwardParameterDict`) so the hook brings them in (indexed, they stayed on the
meta device and the logits were wrong).
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, disk_offload, dispatch_model
from peft import LoraConfig, PeftModel, get_peft_model
from testing_common import build, inputs_for, logits, make_model
from transformers import AutoModelForCausalLM

# SPEFT cases (sparse, hybrid low-rank, with a frozen residual) and peft's LoRA, the reference behaviour.
CASES = ["local", "hybrid", "residual", "lora"]
# Layer 1's MLP and the head on disk, the rest on the CPU (the execution device: only "disk" is offloaded then).
DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "model.layers.0": "cpu",
            "model.layers.1.self_attn": "cpu", "model.layers.1.input_layernorm": "cpu",
            "model.layers.1.post_attention_layernorm": "cpu", "model.layers.1.mlp": "disk", "lm_head": "disk"}


def peft_keys(device_map: dict[str, str]) -> dict[str, str]:
    return {f"base_model.model.{name}": device for name, device in device_map.items()}


def adapted(case: str, **overrides):
    if case == "lora":
        torch.manual_seed(0)
        config = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **overrides)
        return get_peft_model(build("llama"), config).eval()
    # The reference computes as the offloaded model must: accelerate's hooks on a base layer stop the fold (its
    # product would bypass the hooked call), so bit-identity is asked of the same (unfolded) path; the folded
    # default is compared within rounding by `test_offloaded_default_matches_the_folded_model`.
    overrides.setdefault("fold_weights", False)
    return make_model(case, "llama", init_weights=False, **overrides).eval()


@pytest.mark.parametrize("case", CASES)
def test_cpu_offload_and_disk_offload_give_the_same_logits(case, tmp_path):
    model = adapted(case)
    batch = inputs_for("llama")
    expected = logits(model, batch)
    offloaded = cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert {p.device.type for p in offloaded.parameters()} == {"meta"}  # really offloaded, adapter included
    torch.testing.assert_close(logits(offloaded, batch), expected, rtol=0, atol=0)
    on_disk = disk_offload(copy.deepcopy(model), str(tmp_path), execution_device="cpu")
    torch.testing.assert_close(logits(on_disk, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["local", "hybrid"])
def test_offloaded_default_matches_the_folded_model(case):
    """At the default (`fold_weights="auto"`) the resident model folds and the offloaded one runs unfolded: the same
    function, up to float32 rounding."""
    model = adapted(case, fold_weights="auto")
    batch = inputs_for("llama")
    expected = logits(model, batch)
    offloaded = cpu_offload(copy.deepcopy(model), execution_device="cpu")
    torch.testing.assert_close(logits(offloaded, batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_dispatch_model_with_layers_on_disk(case, tmp_path):
    """Adapted layers (layer 1's down_proj) and frozen ones on disk: the same logits; a training step on the
    dispatched model (gradients through the offloaded layers) updates the resident adapter tensors exactly as
    without offload."""
    model = adapted(case)
    batch = inputs_for("llama")
    expected = logits(model, batch)
    dispatched = dispatch_model(copy.deepcopy(model), device_map=peft_keys(DISK_MAP), offload_dir=str(tmp_path))
    layer = dispatched.base_model.model.model.layers[1].mlp.down_proj
    assert "meta" in {p.device.type for p in layer.parameters()}
    torch.testing.assert_close(logits(dispatched, batch), expected, rtol=0, atol=0)

    def step(peft_model) -> dict[str, torch.Tensor]:
        resident = {name: p for name, p in peft_model.named_parameters() if p.requires_grad and not p.is_meta}
        optimizer = torch.optim.SGD(resident.values(), lr=0.1)
        peft_model.train()
        peft_model(**batch).loss.backward()
        optimizer.step()
        return {name: p.detach().clone() for name, p in resident.items()}

    trained, reference = step(dispatched), step(model)
    assert trained and any("layers.0" in name for name in trained)
    for name, value in trained.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_from_pretrained_on_a_base_with_layers_on_disk(case, tmp_path, monkeypatch):
    """A base loaded by transformers with `device_map` and `offload_folder`, the adapter by `PeftModel.from_pretrained`
    with the same map: the logits of the adapter loaded normally. (Adapted layers stay resident here: peft writes the
    adapter weights of disk-offloaded tuner layers into its offload files under LoRA's key layout only.)"""
    monkeypatch.chdir(tmp_path)  # peft's `_update_offload` rewrites the offloaded base file relative to the cwd
    model = adapted(case)
    batch = inputs_for("llama")
    expected = logits(model, batch)
    build("llama").save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    frozen_on_disk = {**DISK_MAP, "model.layers.1.mlp": "cpu", "model.layers.1.post_attention_layernorm": "disk"}
    frozen_on_disk = {**frozen_on_disk, "model.layers.1.input_layernorm": "disk"}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=frozen_on_disk,
                                                offload_folder=tmp_path / "offload")
    assert base.hf_device_map["lm_head"] == "disk"
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", device_map=peft_keys(frozen_on_disk),
                                       offload_folder=tmp_path / "offload").eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


def test_loading_onto_offloaded_adapted_layers_is_refused_clearly(tmp_path, monkeypatch):
    """Adapted layers whose weights accelerate offloaded: a one-line error saying what to do, before any work (peft
    writes only LoRA-style adapter tensors into its offload files; accelerate failed later with "default is on the
    meta device")."""
    monkeypatch.chdir(tmp_path)
    build("llama").save_pretrained(tmp_path / "base")
    adapted("local").save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=DISK_MAP,
                                                offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="accelerate offloaded its weights"):
        PeftModel.from_pretrained(base, tmp_path / "adapter", device_map=peft_keys(DISK_MAP),
                                  offload_folder=tmp_path / "offload")
