"""The opt-in `fold_weights` speed mode: same function and gradients as the default path, base restored on demand."""

from __future__ import annotations

import pytest
import torch
from testing_common import MODELS, build, inputs_for, logits
from peft import get_peft_model

from hf_speft import SparsePeftConfig, sparse_layers


def models(name, **kwargs):
    _, targets, _ = MODELS[name]
    make = lambda fold: get_peft_model(build(name), SparsePeftConfig(  # noqa: E731
        target_modules=targets, density=0.1, salience="magnitude", init_weights=False, fold_weights=fold, **kwargs))
    return make(False), make(True)


def train(model, name, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(steps):
        out = model(**inputs_for(name, seed=step))
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("name", ["mlp", "gpt2-conv1d", "llama"])
def test_fold_trains_like_default_and_restores_base_for_saving(name, tmp_path):
    default, folded = models(name)
    assert train(folded, name) == pytest.approx(train(default, name), rel=1e-4)
    batch = inputs_for(name, seed=9)
    torch.testing.assert_close(logits(folded, batch), logits(default, batch), atol=1e-4, rtol=1e-4)
    base_state = build(name).state_dict()
    state = folded.base_model.model.state_dict()
    for key, value in state.items():
        if "base_layer" in key:
            assert torch.equal(value, base_state[key.replace(".base_layer", "")]), key
    folded.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(folded, batch), logits(default, batch), atol=1e-4, rtol=1e-4)


def test_fold_refuses_several_active_adapters():
    _, folded = models("llama")
    _, targets, _ = MODELS["llama"]
    folded.add_adapter("other", SparsePeftConfig(target_modules=targets, density=0.1, salience="random"))
    folded.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one active adapter"):
        logits(folded, inputs_for("llama"))


def test_fold_keeps_weight_untouched_between_optimizer_steps():
    _, folded = models("llama")
    layer = next(iter(sparse_layers(folded).values()))
    logits(folded, inputs_for("llama"))
    version = layer.get_base_layer().weight._version
    logits(folded, inputs_for("llama", seed=3))
    assert layer.get_base_layer().weight._version == version  # no rewrite while the values are unchanged
