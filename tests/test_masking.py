"""Top-k selection: exact counts, global vs local, deterministic tie-breaking, no concatenation needed."""

from __future__ import annotations

import pytest
import torch

from hf_speft.masking import MaskSelector, local_budgets, select_mask


def scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(6, 5, generator=g), "b": torch.rand(4, 8, generator=g) * 2,
            "c": torch.rand(3, 3, generator=g)}


def brute_force_global(layer_scores, budget):
    """Reference: each layer's best entry (ties to the lower index), then the best `budget - layers` of all other
    entries ranked together (ties to the earlier layer, then the lower index)."""
    chosen = {name: set() for name in layer_scores}
    rest = []
    for position, (name, value) in enumerate(layer_scores.items()):
        flat = value.reshape(-1).tolist()
        best = min(range(len(flat)), key=lambda i: (-flat[i], i))
        chosen[name].add(best)
        rest += [(-flat[i], position, i, name) for i in range(len(flat)) if i != best]
    for _, _, index, name in sorted(rest)[: budget - len(layer_scores)]:
        chosen[name].add(index)
    return {name: sorted(indices) for name, indices in chosen.items()}


@pytest.mark.parametrize("budget", [3, 7, 30, 71])
def test_global_keeps_each_layers_best_and_ranks_the_rest_together(budget):
    s = scores()
    masks = select_mask(s, budget, "global")
    assert sum(m.numel() for m in masks.values()) == budget
    assert {name: mask.tolist() for name, mask in masks.items()} == brute_force_global(s, budget)
    for mask in masks.values():
        assert torch.equal(mask, mask.sort().values) and mask.numel() >= 1


@pytest.mark.parametrize("scope", ["global", "local"])
def test_every_layer_trains_at_least_one_weight(scope):
    """A layer whose scores all rank below the others' still gets one entry (no 0-element trainable values)."""
    s = {"loud": torch.full((8, 8), 100.0) + torch.rand(8, 8), "quiet": torch.rand(2, 2), "tiny": torch.rand(1, 3)}
    masks = select_mask(s, 5, scope)
    assert all(mask.numel() >= 1 for mask in masks.values()) and sum(m.numel() for m in masks.values()) == 5
    assert masks["quiet"].tolist() == [int(s["quiet"].argmax())]
    with pytest.raises(ValueError, match="every targeted layer trains at least one weight"):
        select_mask(s, 2, scope)


@pytest.mark.parametrize("budget", [3, 10, 40, 71])
def test_local_same_density_and_exact_total(budget):
    s = scores()
    masks = select_mask(s, budget, "local")
    assert sum(m.numel() for m in masks.values()) == budget
    for name, mask in masks.items():
        assert abs(mask.numel() - 1 - (budget - 3) * (s[name].numel() - 1) / 68) < 1
        k = mask.numel()
        assert set(mask.tolist()) == set(s[name].reshape(-1).topk(k).indices.tolist())


def test_ties_break_to_first_layer_then_lowest_index():
    s = {"a": torch.ones(2, 3), "b": torch.ones(2, 2)}
    masks = select_mask(s, 4, "global")
    assert masks["a"].tolist() == [0, 1, 2] and masks["b"].tolist() == [0]
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
    assert local_budgets({"a": 1000, "b": 1}, 2) == {"a": 1, "b": 1}
    assert sum(local_budgets({"a": 3, "b": 7, "c": 11}, 13).values()) == 13


@pytest.mark.parametrize(("budget", "scope"),
                         [(0, "global"), (2, "global"), (2, "local"), (72, "global"), (5, "layer")])
def test_bad_selection_arguments(budget, scope):
    with pytest.raises(ValueError, match="budget=|scope="):
        select_mask(scores(), budget, scope)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_selector_fed_in_groups_equals_selecting_at_once(scope):
    generator = torch.Generator().manual_seed(3)
    # integer scores: many ties across and within layers exercise the tie order (earlier layer, lower index)
    layers = {f"layer{i}": torch.randint(0, 6, (size,), generator=generator).float()
              for i, size in enumerate([40, 7, 64, 1, 33])}
    for budget in (5, 6, 17, 60, 145):
        expected = select_mask(layers, budget, scope)
        selector = MaskSelector({name: value.numel() for name, value in layers.items()}, budget, scope)
        for group in (["layer0", "layer1"], ["layer2"], ["layer3", "layer4"]):
            selector.add({name: layers[name] for name in group})
        masks = selector.masks()
        assert masks.keys() == expected.keys()
        for name in layers:
            assert torch.equal(masks[name], expected[name]), (budget, name)


def test_global_selection_equals_a_full_sort_after_many_prunes():
    """Many small layers against a small budget: the candidate buffer is pruned many times and later layers are
    filtered by the floor; integer scores make ties at the floor, which must go to the earlier layer."""
    generator = torch.Generator().manual_seed(5)
    layers = {f"layer{i}": torch.randint(0, 4, (int(size),), generator=generator).float()
              for i, size in enumerate(torch.randint(1, 30, (40,), generator=generator))}
    for budget in (40, 41, 47, 90, 300):
        selector = MaskSelector({name: value.numel() for name, value in layers.items()}, budget)
        for name, value in layers.items():
            selector.add({name: value})
        masks = selector.masks()
        assert {name: mask.tolist() for name, mask in masks.items()} == brute_force_global(layers, budget), budget


def test_selector_refuses_out_of_order_or_missing_layers():
    selector = MaskSelector({"a": 4, "b": 4}, 2)
    with pytest.raises(ValueError, match="'b' arrived out of order; expected 'a'"):
        selector.add({"b": torch.zeros(4)})
    selector.add({"a": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"No scores were added for \['b'\]"):
        selector.masks()
    with pytest.raises(ValueError, match="'b' have 3 entries; expected 4"):
        selector.add({"b": torch.zeros(3)})
