"""The opt-in `fold_weights` speed mode: same function and gradients as the default path, base restored on demand;
`fold_weights="auto"` folds only where that is exact and nothing else sees the weight."""

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
    state = layer._folded
    logits(folded, inputs_for("llama", seed=3))
    assert state is not None and layer._folded is state  # no rewrite while the values are unchanged


def test_every_read_of_a_folded_base_weight_sees_the_unfolded_weight(tmp_path):
    """Whatever reads the base weight while a delta is folded into it gets the base's own weight (or, after a
    write behind the fold's back, an error), never the folded one."""
    import copy

    default, folded = models("llama")  # init_weights=False: a nonzero delta
    originals = {key: value for key, value in build("llama").state_dict().items()}
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    key = name.removeprefix("base_model.model.") + ".weight"

    def fold(model):
        logits(model, inputs_for("llama", seed=7))
        layer = dict(sparse_layers(model))[name]
        assert not torch.equal(layer.base_layer.weight, originals[key])  # the forward computes with the fold
        return layer

    layer, reference = fold(folded), dict(sparse_layers(default))[name]
    assert torch.equal(layer.get_base_layer().weight, originals[key])
    assert torch.equal(fold(folded).weight, originals[key])  # peft's `weight` property
    assert torch.equal(folded.state_dict()[f"{name}.base_layer.weight"], originals[key])
    fold(folded)
    torch.testing.assert_close(layer.effective_weight(), reference.effective_weight())
    fold(folded)
    torch.testing.assert_close(layer.get_delta_weight("default"), reference.get_delta_weight("default"))
    copied = copy.deepcopy(fold(folded))
    assert torch.equal(copied.get_base_layer().weight, originals[key])
    fold(folded)
    folded.save_pretrained(tmp_path / "adapter")
    assert torch.equal(layer.get_base_layer().weight, originals[key])
    fold(folded)
    folded.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, reference.effective_weight())
    folded.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, originals[key])
    fold(folded)
    merged = copy.deepcopy(folded).merge_and_unload()
    torch.testing.assert_close(merged.get_submodule(name.removeprefix("base_model.model.")).weight,
                               reference.effective_weight())
    unloaded = folded.unload()
    assert torch.equal(unloaded.get_submodule(name.removeprefix("base_model.model.")).weight, originals[key])


def test_a_write_behind_a_fold_is_refused_not_lost():
    _, folded = models("llama")
    logits(folded, inputs_for("llama"))
    layer = next(iter(sparse_layers(folded).values()))
    layer.base_layer.weight.data.mul_(2)  # not through get_base_layer(): the fold cannot be undone exactly
    with pytest.raises(RuntimeError, match="was written while adapter 'default'.s delta was folded"):
        folded.state_dict()


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base weights as the forward computes with them (`base_layer.weight`, not `get_base_layer()` or
    `state_dict`, which restore a folded base)."""
    return {name: layer.base_layer.weight.detach().clone() for name, layer in sparse_layers(model).items()}


def test_auto_folds_a_float32_base_and_trains_like_the_unfolded_path():
    default, _ = models("llama")
    _, targets, _ = MODELS["llama"]
    auto = get_peft_model(build("llama"), SparsePeftConfig(target_modules=targets, density=0.1, salience="magnitude",
                                                            init_weights=False, fold_weights="auto"))
    before = base_weights(auto)
    assert train(auto, "llama") == pytest.approx(train(default, "llama"), rel=1e-4)
    assert all(not torch.equal(before[name], weight) for name, weight in base_weights(auto).items())  # folded
    state = auto.base_model.model.state_dict()  # restores the base
    assert all(torch.equal(state[name.removeprefix("base_model.model.") + ".base_layer.weight"], weight)
               for name, weight in before.items())


@pytest.mark.parametrize("case", ["bfloat16", "float16", "two-adapters", "hybrid", "shared-weight"])
def test_auto_runs_unfolded_where_folding_is_inexact_or_seen_elsewhere(case):
    _, targets, _ = MODELS["llama"]
    options = {"target_modules": targets, "density": 0.1, "salience": "magnitude", "init_weights": False,
               "fold_weights": "auto"}
    base = build("llama")
    if case in ("bfloat16", "float16"):  # W0+Δ rounded to the base dtype would drop small deltas
        base = base.to(getattr(torch, case))
    if case == "hybrid":
        options.update(lora_r=1, match_lora_rank=2, density=None)
    if case == "shared-weight":  # another module uses the targeted weight: folding would change it too
        layer = base.model.layers[0]
        layer.self_attn.o_proj.weight = layer.self_attn.q_proj.weight
        options["target_modules"] = ["layers.0.self_attn.q_proj"]
    model = get_peft_model(base, SparsePeftConfig(**options))
    if case == "two-adapters":
        model.add_adapter("other", SparsePeftConfig(**{**options, "salience": "random"}))
        model.base_model.set_adapter(["default", "other"])
    before = base_weights(model)
    model.train()
    model(**inputs_for("llama")).loss.backward()
    assert all(torch.equal(before[name], weight) for name, weight in base_weights(model).items())
    assert all(layer.speft_values["default"].grad is not None for layer in sparse_layers(model).values())
