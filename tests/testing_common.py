"""What the tests share, in the shape of peft's `tests/testing_common.py`: tiny models built from configs (no
downloads), inputs for them, the config cases of the test matrix, and one dense reference of a SPEFT model.

The matrix is `CASES` (every config case × every model) plus `QUANTIZED_CASES` (8-bit bases, for the transformers
models bitsandbytes can quantize); which combinations exist is decided here and nowhere else.
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import hf_speft  # noqa: F401  (first: registers SPEFT with peft and quiets bitsandbytes' import notice)
import torch
from peft import get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hf_speft import SparsePeftConfig, SparsePeftLayer, sparse_layers


class MLP(nn.Module):
    """A small MLP with a loss, shaped like peft's test MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 2)

    def forward(self, X, labels=None):
        logits = self.head(self.relu(self.lin1(self.relu(self.lin0(X)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"logits": logits, "loss": loss}


def tiny_llama() -> nn.Module:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_qwen2() -> nn.Module:
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


# name -> (factory, target_modules, modules_to_save)
MODELS = {
    "mlp": (MLP, ["lin0", "lin1"], ["head"]),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_proj"], None),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    "qwen2": (tiny_qwen2, ["q_proj", "v_proj", "down_proj"], None),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def inputs_for(name: str, seed: int = 1, batch: int = 4) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return {"X": torch.randn(batch, 10, generator=generator),
                "labels": torch.randint(0, 2, (batch,), generator=generator)}
    ids = torch.randint(0, 64, (batch, 12), generator=generator)
    return {"input_ids": ids, "labels": ids}


def logits(model, batch) -> torch.Tensor:
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out["logits"] if isinstance(out, dict) else out.logits


# Config cases, in peft's (name, kwargs) form; every one is data-free, so get_peft_model returns a trainable adapter.
CONFIGS = {
    "defaults": {},  # target_modules alone (the budget defaults to a rank-8 LoRA's)
    "global-tight": {"num_params": 40, "mask_scope": "global"},  # a budget that once left layers with no entry
    "local": {"density": 0.05, "mask_scope": "local"},
    "random": {"density": 0.05, "salience": "random"},
    "hybrid": {"match_lora_rank": 4, "lora_r": 1, "lora_alpha": 1},  # scaling 1: a random B·A stays moderate
    "fold": {"density": 0.05, "fold_weights": True},
    "residual": {"density": 0.05, "mask_update": "dynamic"},  # one dynamic mask update done: a frozen residual
}
CASES = [(config, model) for config in CONFIGS for model in MODELS]
SPARSE_ONLY_CASES = [(config, model) for config, model in CASES if not CONFIGS[config].get("lora_r")]
TRANSFORMERS_CASES = [(config, model) for config, model in CASES if model != "mlp"]
QUANTIZED_MODELS = ("llama", "qwen2")  # bitsandbytes quantizes nn.Linear layers of transformers models
QUANTIZED_CASES = [("8bit", model) for model in QUANTIZED_MODELS]


def make_config(config_name: str, model_name: str, **overrides) -> SparsePeftConfig:
    _, targets, to_save = MODELS[model_name]
    kwargs = {"target_modules": targets, "modules_to_save": to_save, "salience": "magnitude",
              **CONFIGS.get(config_name, {"density": 0.05}), **overrides}
    return SparsePeftConfig(**kwargs)


def base_for(config_name: str, model_name: str, seed: int = 0) -> nn.Module:
    """The base model of a case: `build(model_name)`, or for "8bit" the same weights loaded in 8 bits."""
    if config_name != "8bit":
        return build(model_name, seed)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        build(model_name, seed).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                    device_map="cpu").eval()


def make_model(config_name: str, model_name: str, **overrides):
    """The case's SPEFT model (see `with_case_state`)."""
    model = get_peft_model(base_for(config_name, model_name), make_config(config_name, model_name, **overrides))
    return with_case_state(model, config_name)


def with_case_state(model, config_name: str):
    """The "residual" case has had one dynamic mask update (random scores), so part of a nonzero delta lives in the
    frozen residual; the other cases are used as built."""
    if config_name == "residual":
        generator = torch.Generator().manual_seed(7)
        scores = {name: torch.rand(layer.out_features, layer.in_features, generator=generator)
                  for name, layer in sparse_layers(model.base_model.model).items()}
        model.base_model.update_masks("default", scores)
    return model


def dense_reference(model: nn.Module, adapter: str = "default") -> nn.Module:
    """A plain copy of the model's base in which every SPEFT layer is its base layer with the adapter's whole delta
    (mask, residual and low-rank part, built here from the raw tensors) added to a dense float copy of the weight,
    and every modules_to_save wrapper is the adapter's copy."""
    from peft.utils.other import ModulesToSaveWrapper

    reference = copy.deepcopy(model.get_base_model())
    for name, module in list(reference.named_modules()):
        if isinstance(module, SparsePeftLayer):
            replacement = _dense_layer(module, adapter)
        elif isinstance(module, ModulesToSaveWrapper):
            copies = module.modules_to_save
            replacement = copies[adapter] if adapter in copies else module.original_module
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent_name) if parent_name else reference, child, replacement)
    return reference


def _dense_layer(layer: SparsePeftLayer, adapter: str) -> nn.Module:
    from hf_speft.layer import dense_weight

    delta = torch.zeros(layer.out_features * layer.in_features)
    if adapter in layer.speft_values:
        delta[layer.speft_indices[adapter].long()] = layer.speft_values[adapter].detach().float()
        if adapter in layer.speft_residual_indices:
            delta[layer.speft_residual_indices[adapter].long()] = layer.speft_residual_values[adapter].float()
    delta = delta.view(layer.out_features, layer.in_features)
    if adapter in layer.speft_lora_A:
        lora_a, lora_b = layer.speft_lora_A[adapter].detach(), layer.speft_lora_B[adapter].detach()
        delta += lora_b.float() @ lora_a.float() * layer.speft_lora_scaling[adapter]
    base = layer.get_base_layer()
    weight = dense_weight(base, layer.fan_in_fan_out) + delta
    dense = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None)
    dense.weight.data = weight
    if base.bias is not None:
        dense.bias.data = base.bias.detach().float().clone()
    return dense


def doc_examples(path: Path, *words: str, substitutions: dict[str, str] | None = None) -> list[str]:
    """The ```python blocks of a Markdown file that mention any of `words`, with each `substitutions` key (e.g. a Hub
    model id) replaced by its value (e.g. a tiny local model), ready for `run_doc_example`."""
    blocks = [block for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
              if any(word in block for word in words)]
    for old, new in (substitutions or {}).items():
        blocks = [block.replace(old, new) for block in blocks]
    return blocks


def run_doc_example(block: str, path: Path, namespace: dict) -> dict:
    """Run one documentation example as written, with `namespace` holding the names its text says it assumes."""
    exec(compile(block, str(path), "exec"), namespace)
    return namespace
