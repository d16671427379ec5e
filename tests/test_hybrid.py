"""Hybrid mode (`lora_r > 0`): a sparse delta plus a low-rank pair in one SPEFT adapter. The generic checks (dense
reference, merging, saving, training) run on the "hybrid" case of the matrix in test_peft_generic.py."""

from __future__ import annotations

import pytest
import torch
from testing_common import MODELS, build, inputs_for
from peft import get_peft_model

from hf_speft import SparsePeftConfig, calibrate, sparse_layers
from hf_speft.salience.context import logical_weight


def hybrid_model(name: str, **kwargs):
    _, targets, to_save = MODELS[name]
    options = dict(target_modules=targets, modules_to_save=to_save, match_lora_rank=4, lora_r=2, lora_alpha=4,
                   salience="magnitude", init_weights=False)
    options.update(kwargs)
    return get_peft_model(build(name), SparsePeftConfig(**options))


def test_hybrid_budget_is_split_exactly_between_the_mask_and_the_low_rank_pair():
    model = hybrid_model("llama")
    layers = sparse_layers(model)
    low_rank = sum(2 * (layer.out_features + layer.in_features) for layer in layers.values())
    total = sum(4 * (layer.out_features + layer.in_features) for layer in layers.values())
    nnz = sum(layer.speft_values["default"].numel() for layer in layers.values())
    assert nnz == total - low_rank > 0
    assert model.get_nb_trainable_parameters()[0] == total
    config = model.peft_config["default"]
    shapes = [(layer.out_features, layer.in_features) for layer in layers.values()]
    assert config.budget_split(shapes) == (total - low_rank, low_rank)


def test_hybrid_safe_merge_catches_a_broken_low_rank_part():
    model = hybrid_model("llama")
    with torch.no_grad():
        next(iter(sparse_layers(model).values())).speft_lora_B["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


def test_hybrid_salience_scores_the_weight_with_the_low_rank_part_present():
    model = hybrid_model("llama")
    layer = next(iter(sparse_layers(model).values()))
    expected = layer.get_base_layer().weight.detach().clone()
    indices, values = layer.delta_entries("default")
    expected.view(-1)[indices] += values.detach()
    expected += layer.low_rank_delta("default")
    torch.testing.assert_close(logical_weight(layer), expected)


def test_hybrid_calibration_selects_the_sparse_part_of_the_budget():
    model = hybrid_model("llama", salience="gradient", salience_batches=2, init_weights=True)
    batches = [inputs_for("llama", seed=seed) for seed in range(2)]
    calibrate(model, batches, show_progress=False)
    layers = sparse_layers(model)
    total = sum(4 * (layer.out_features + layer.in_features) for layer in layers.values())
    low_rank = sum(2 * (layer.out_features + layer.in_features) for layer in layers.values())
    assert sum(layer.speft_values["default"].numel() for layer in layers.values()) == total - low_rank


def test_deleting_a_hybrid_adapter_removes_its_low_rank_pair():
    model = hybrid_model("llama")
    _, targets, _ = MODELS["llama"]
    model.add_adapter("other", SparsePeftConfig(target_modules=targets, density=0.05, salience="magnitude"))
    model.delete_adapter("default")
    for layer in sparse_layers(model).values():
        assert "default" not in layer.speft_lora_A and "default" not in layer.speft_lora_scaling


def test_a_low_rank_part_that_takes_the_whole_budget_is_refused():
    with pytest.raises(ValueError, match=r"The sparse part gets 0 trainable weights .* lora_r=4\), but every one of "
                                         r"the 14 targeted layers"):
        hybrid_model("llama", lora_r=4)


def test_hybrid_layer_keeps_no_dense_delta_for_backward():
    """O(nnz + r·(m+n)) state: the only weight-sized tensor autograd saves is the frozen base weight itself."""
    model = hybrid_model("llama", init_weights=True)
    layer = next(iter(sparse_layers(model).values()))
    weight = layer.get_base_layer().weight
    saved = []
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    weight_sized = [t for t in saved if t.numel() >= weight.numel()]
    assert weight_sized and all(t.data_ptr() == weight.data_ptr() for t in weight_sized)
    out.sum().backward()
    assert layer.speft_lora_B["default"].grad is not None and layer.speft_values["default"].grad.shape == (
        layer.speft_values["default"].numel(),)
    assert weight.grad is None
