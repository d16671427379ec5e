"""Tiny models built from configs (no downloads) and inputs for them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hf_speft  # noqa: F401  (registers SPEFT with peft)


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


@pytest.fixture(params=list(MODELS))
def model_name(request) -> str:
    return request.param
