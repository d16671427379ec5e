"""Registration with peft and every generic peft entry point."""

from __future__ import annotations

import importlib
import json
import pickle
import subprocess
import sys

import pytest
import torch
from testing_common import inputs_for, logits, tiny_llama
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import hf_speft
from hf_speft import SparsePeftConfig, SparsePeftModel, sparse_layers

TARGETS = ["q_proj", "v_proj"]


def llama_peft(**kwargs):
    torch.manual_seed(0)
    config = SparsePeftConfig(target_modules=TARGETS, density=0.05, salience="magnitude", **kwargs)
    return get_peft_model(tiny_llama(), config)


def test_peft_type_member_and_mappings():
    assert PeftType.SPEFT.value == "SPEFT"
    assert PeftType("SPEFT") is PeftType.SPEFT and PeftType["SPEFT"] is PeftType.SPEFT
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SPEFT"] is SparsePeftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPEFT] is SparsePeftModel
    assert SparsePeftConfig(density=0.1).peft_type is PeftType.SPEFT


def test_reimport_and_reload_are_idempotent():
    importlib.import_module("hf_speft")
    reloaded = importlib.reload(hf_speft._registry)
    assert reloaded.SPEFT_PEFT_TYPE is PeftType.SPEFT
    assert list(PeftType).count(PeftType.SPEFT) == 1
    hf_speft.register_sparse_peft(SparsePeftConfig, SparsePeftModel)
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPEFT] is SparsePeftModel


def test_conflicting_registration_is_refused():
    class OtherModel:
        prefix = "speft_"

    with pytest.raises(KeyError, match="already registered"):
        hf_speft.register_sparse_peft(SparsePeftConfig, OtherModel)


def test_pickled_config_loads_in_a_fresh_process(tmp_path):
    path = tmp_path / "config.pkl"
    path.write_bytes(pickle.dumps(SparsePeftConfig(target_modules=TARGETS, num_params=10)))
    code = f"import pickle; c = pickle.loads(open({str(path)!r}, 'rb').read()); print(c.peft_type.value, c.num_params)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["SPEFT", "10"]


def test_save_writes_compact_safetensors(tmp_path):
    from safetensors import safe_open

    model = llama_peft(init_weights=False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(".speft_" in key for key in keys)
        assert {key.rsplit(".", 1)[1] for key in keys} == {"speft_indices", "speft_values", "speft_weight_shape"}
        indices = f.get_tensor(next(k for k in keys if k.endswith("speft_indices")))
        assert indices.dtype == torch.int32
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPEFT" and saved["density"] == 0.05
    card = (tmp_path / "README.md").read_text()
    assert "peft" in card


def test_peft_config_and_auto_peft_model_from_pretrained(tmp_path):
    model = llama_peft(init_weights=False)
    batch = inputs_for("llama")
    expected = logits(model, batch)
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    tiny_llama().save_pretrained(base_dir)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert isinstance(config, SparsePeftConfig) and config.target_modules == set(TARGETS)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(auto, PeftModel)
    torch.testing.assert_close(logits(auto, batch), expected)


def test_load_trainable_and_inference_modes(tmp_path):
    llama_peft(init_weights=False).save_pretrained(tmp_path)
    torch.manual_seed(0)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    torch.manual_seed(0)
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_print_trainable_parameters(capsys):
    model = llama_peft()
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    out = capsys.readouterr().out
    assert f"trainable params: {trainable:,}" in out and "not calibrated" not in out
    assert 0 < trainable < total


def test_print_trainable_parameters_before_calibration_shows_the_budget(capsys):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, match_lora_rank=2))  # gradient
    model.print_trainable_parameters()
    budget = 2 * sum(32 + layer.out_features for layer in sparse_layers(model).values())
    out = capsys.readouterr().out
    assert "trainable params: 0 " in out
    assert f"SPEFT adapter 'default' is not calibrated yet: its mask will train {budget:,} weights" in out


def test_push_to_hub_uploads_the_adapter_folder(monkeypatch):
    """Everything up to the network call is real; only the Hub API calls are replaced."""
    import huggingface_hub

    uploaded = {}

    def fake_create_commit(self, repo_id, operations, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                uploaded["files"][op.path_in_repo] = f.read()
        return huggingface_hub.CommitInfo(commit_url=f"https://hf.co/{repo_id}/commit/0", commit_message="m",
                                          commit_description="", oid="0" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://hf.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)

    def no_remote_card(*args, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError("the new repo has no README.md yet")

    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", no_remote_card)
    model = llama_peft(init_weights=False)
    model.push_to_hub("user/speft-adapter", token="dummy")
    assert uploaded["repo_id"] == "user/speft-adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(uploaded["files"])
    assert json.loads(uploaded["files"]["adapter_config.json"])["peft_type"] == "SPEFT"

