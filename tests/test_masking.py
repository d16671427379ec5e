"""Top-k selection: exact counts, global vs local, deterministic tie-breaking, no concatenation needed."""

from __future__ import annotations

import pytest
import torch

from hf_speft.masking import MaskSelector, local_budgets, select_mask


def scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(6, 5, generator=g), "b": torch.rand(4, 8, generator=g) * 2, "c": torch.rand(3, 3, generator=g)}


@pytest.mark.parametrize("budget", [1, 7, 30, 71])
def test_global_equals_brute_force_topk(budget):
    s = scores()
    masks = select_mask(s, budget, "global")
    assert sum(m.numel() for m in masks.values()) == budget
    flat = torch.cat([v.reshape(-1) for v in s.values()])
    threshold = flat.topk(budget).values.min()
    for name, mask in masks.items():
        assert torch.equal(mask, mask.sort().values)
        assert (s[name].reshape(-1)[mask] >= threshold).all()


@pytest.mark.parametrize("budget", [3, 10, 40, 71])
def test_local_same_density_and_exact_total(budget):
    s = scores()
    masks = select_mask(s, budget, "local")
    assert sum(m.numel() for m in masks.values()) == budget
    for name, mask in masks.items():
        assert abs(mask.numel() - budget * s[name].numel() / 71) < 1
        k = mask.numel()
        if k:
            assert set(mask.tolist()) == set(s[name].reshape(-1).topk(k).indices.tolist())


def test_ties_break_to_first_layer_then_lowest_index():
    s = {"a": torch.ones(2, 3), "b": torch.ones(2, 2)}
    masks = select_mask(s, 4, "global")
    assert masks["a"].tolist() == [0, 1, 2, 3] and masks["b"].tolist() == []
    masks = select_mask(s, 8, "global")
    assert masks["a"].tolist() == list(range(6)) and masks["b"].tolist() == [0, 1]
    assert select_mask({"a": torch.zeros(10)}, 3, "local")["a"].tolist() == [0, 1, 2]


def test_nan_scores_rank_last():
    s = {"a": torch.tensor([float("nan"), 0.1, float("nan"), 0.2])}
    assert select_mask(s, 2)["a"].tolist() == [1, 3]


def test_bfloat16_scores():
    s = {name: value.bfloat16() for name, value in scores(1).items()}
    assert sum(m.numel() for m in select_mask(s, 25).values()) == 25


def test_local_budgets_largest_remainder():
    assert local_budgets({"a": 10, "b": 10, "c": 10}, 4) == {"a": 2, "b": 1, "c": 1}
    assert sum(local_budgets({"a": 3, "b": 7, "c": 11}, 13).values()) == 13


@pytest.mark.parametrize(("budget", "scope"), [(0, "global"), (72, "global"), (5, "layer")])
def test_bad_selection_arguments(budget, scope):
    with pytest.raises(ValueError, match="budget=|scope="):
        select_mask(scores(), budget, scope)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_selector_fed_in_groups_equals_selecting_at_once(scope):
    generator = torch.Generator().manual_seed(3)
    # integer scores: many ties across and within layers exercise the tie order (earlier layer, lower index)
    layers = {f"layer{i}": torch.randint(0, 6, (size,), generator=generator).float()
              for i, size in enumerate([40, 7, 64, 1, 33])}
    for budget in (1, 5, 17, 60, 145):
        expected = select_mask(layers, budget, scope)
        selector = MaskSelector({name: value.numel() for name, value in layers.items()}, budget, scope)
        for group in (["layer0", "layer1"], ["layer2"], ["layer3", "layer4"]):
            selector.add({name: layers[name] for name in group})
        masks = selector.masks()
        assert masks.keys() == expected.keys()
        for name in layers:
            assert torch.equal(masks[name], expected[name]), (budget, name)


def test_selector_refuses_out_of_order_or_missing_layers():
    selector = MaskSelector({"a": 4, "b": 4}, 2)
    with pytest.raises(ValueError, match="'b' arrived out of order; expected 'a'"):
        selector.add({"b": torch.zeros(4)})
    selector.add({"a": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"No scores were added for \['b'\]"):
        selector.masks()
    with pytest.raises(ValueError, match="'b' have 3 entries; expected 4"):
        selector.add({"b": torch.zeros(3)})
