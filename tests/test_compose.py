"""Composing and serving sparse adapters: `add_weighted_adapter` against dense arithmetic on the dense deltas,
`hf-speft compose`, O(nnz) hot-swapping (`activate_adapter`, bit-exact), and mixed-adapter `generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testing_common import doc_examples, run_doc_example, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import hf_speft.layer
from hf_speft import SparsePeftConfig, sparse_layers
from hf_speft_cli import main as cli

TARGETS = ["q_proj", "v_proj", "up_proj"]
COMBINATIONS = ["linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def adapter_config(seed: int, **overrides) -> SparsePeftConfig:
    """Random masks (partly overlapping between seeds) with random nonzero values."""
    return SparsePeftConfig(**{"target_modules": TARGETS, "density": 0.2, "salience": "random", "seed": seed,
                               "init_weights": False, **overrides})


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_llama()


def two_adapter_model():
    model = get_peft_model(base_model(), adapter_config(1), adapter_name="math")
    model.add_adapter("code", adapter_config(2))
    return model.eval()


def dense_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    return {name: layer.get_delta_weight(adapter).float()
            for name, layer in sorted(sparse_layers(model, adapter).items())}


def magnitude_pruned(delta: torch.Tensor, density: float) -> torch.Tensor:
    flat = delta.flatten()
    top = torch.topk(flat.abs(), int(density * int((flat != 0).sum()))).indices
    kept = torch.zeros_like(flat)
    kept[top] = flat[top]
    return kept.view_as(delta)


def dare_pruned(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    flat = delta.flatten()
    entries = flat.nonzero().squeeze(1)  # the adapter's entries, in index order
    keep = torch.rand(entries.numel(), generator=generator) < density
    pruned = torch.zeros_like(flat)
    pruned[entries] = flat[entries] * keep / density
    return pruned.view_as(delta)


def ties_merged(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(tensors)
    agree = stacked.sign() == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    weighted = stacked * torch.tensor(weights).view(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def dense_reference(model, adapters, weights, combination, density, seed) -> dict[str, torch.Tensor]:
    """The composition computed on the dense (out, in) deltas, written independently of hf_speft.compose."""
    deltas = [dense_deltas(model, adapter) for adapter in adapters]
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name in deltas[0]:
        tensors = [delta[name] for delta in deltas]
        if combination in ("ties", "magnitude_prune"):
            tensors = [magnitude_pruned(tensor, density) for tensor in tensors]
        elif combination.startswith("dare"):
            tensors = [dare_pruned(tensor, density, generator) for tensor in tensors]
        if combination in ("ties", "dare_ties"):
            result[name] = ties_merged(tensors, weights)
        else:
            result[name] = sum(weight * tensor for weight, tensor in zip(weights, tensors))
    return result


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_composition_equals_dense_arithmetic(combination):
    model = two_adapter_model()
    density = None if combination in ("linear", "cat") else 0.5
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["math", "code"], weights, "both", combination_type=combination, density=density,
                               seed=3)
    expected = dense_reference(model, ["math", "code"], weights, combination, density, seed=3)
    composed = dense_deltas(model, "both")
    union = {name: (dense_deltas(model, "math")[name] != 0) | (dense_deltas(model, "code")[name] != 0)
             for name in expected}
    for name, delta in composed.items():
        if combination in ("linear", "cat"):
            assert torch.equal(delta, expected[name]), name  # exact: the same float32 sums
        else:
            torch.testing.assert_close(delta, expected[name], rtol=1e-6, atol=1e-7)
        layer = sparse_layers(model, "both")[name]
        assert torch.equal(torch.zeros_like(delta).view(-1).index_fill_(0, layer.speft_indices["both"].long(), 1)
                           .view_as(delta).bool(), union[name])  # the mask is the union of the masks
    assert any((delta != 0).sum() < union[name].sum() for name, delta in composed.items()) == (
        combination not in ("linear", "cat"))  # pruning really dropped entries


def test_dare_is_seeded():
    model = two_adapter_model()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        model.add_weighted_adapter(["math", "code"], [1.0, 1.0], name, combination_type="dare_ties", density=0.5,
                                   seed=seed)
    a, b, c = (dense_deltas(model, name) for name in "abc")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], c[name]) for name in a)


def test_budget_keeps_the_largest_entries_and_one_per_layer():
    model = two_adapter_model()
    model.add_weighted_adapter(["math", "code"], [1.0, 1.0], "full")
    model.add_weighted_adapter(["math", "code"], [1.0, 1.0], "small", budget=300)
    layers = sparse_layers(model, "small")
    assert sum(layer.speft_values["small"].numel() for layer in layers.values()) == 300
    kept, dropped = [], []
    for name, layer in layers.items():
        full = sparse_layers(model, "full")[name]
        indices, values = full.speft_indices["full"].long(), full.speft_values["full"].detach().abs()
        chosen = torch.isin(indices, layer.speft_indices["small"].long())
        assert chosen.any()
        reserved = values.argmax()  # each layer's largest entry is kept whatever its rank
        chosen_values = values.clone()
        chosen_values[reserved] = float("nan")
        kept.append(chosen_values[chosen])
        dropped.append(values[~chosen])
    kept, dropped = torch.cat(kept), torch.cat(dropped)
    assert kept[~kept.isnan()].min() >= dropped.max()
    with pytest.raises(ValueError, match="budget=2 must be an integer of at least the number of modules"):
        model.add_weighted_adapter(["math", "code"], [1.0, 1.0], "tiny", budget=2)


def test_composed_adapter_is_an_ordinary_adapter(tmp_path):
    model = two_adapter_model()
    model.add_weighted_adapter(["math", "code"], [0.7, 0.3], "both", combination_type="ties", density=0.5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".both" in n)  # added frozen, as in peft
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model.set_adapter("both")
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, selected_adapters=["both"])
    assert cli(["inspect", str(tmp_path / "both")]) == 0
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "both").eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    # trains further: the composed values receive gradients
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [layer.speft_values["both"].grad for layer in sparse_layers(model, "both").values()]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads)
    merged = model.eval().merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_composition_refuses_bad_input():
    model = two_adapter_model()
    model.add_adapter("attention", adapter_config(3, target_modules=["q_proj"]))
    model.add_adapter("hybrid", adapter_config(4, density=None, match_lora_rank=4, lora_r=1))
    cases = [
        (dict(adapters=["math", "attention"], weights=[1, 1]), "target different modules"),
        (dict(adapters=["math", "hybrid"], weights=[1, 1]), "hybrid"),
        (dict(adapters=["math", "nope"], weights=[1, 1]), r"\['nope'\] are not SPEFT adapters"),
        (dict(adapters=["math", "code"], weights=[1]), "1 weights for 2 adapters"),
        (dict(adapters=["math", "code"], weights=[1, 1], combination_type="svd"), "combination_type='svd'"),
        (dict(adapters=["math", "code"], weights=[1, 1], combination_type="ties"), "needs a density"),
        (dict(adapters=["math", "code"], weights=[1, 1], density=0.5), "density applies to"),
        (dict(adapters=["math", "code"], weights=[1, 1], adapter_name="code"), "exists already"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.add_weighted_adapter(**{"adapter_name": "new", **kwargs})
    assert "new" not in model.peft_config  # nothing was added by a refused call


def test_cli_compose_matches_add_weighted_adapter(tmp_path):
    model = two_adapter_model()
    model.save_pretrained(tmp_path)  # math/ and code/
    model.add_weighted_adapter(["math", "code"], [0.7, 0.3], "both", combination_type="dare_ties", density=0.5,
                               seed=5)
    out = tmp_path / "both_cli"
    assert cli(["compose", str(tmp_path / "math"), str(tmp_path / "code"), "--weights", "0.7", "0.3", "--combination",
                "dare_ties", "--density", "0.5", "--seed", "5", "--out", str(out)]) == 0
    reloaded = PeftModel.from_pretrained(base_model(), out)
    expected = dense_deltas(model, "both")
    for name, delta in dense_deltas(reloaded, "default").items():
        torch.testing.assert_close(delta, expected[name], rtol=0, atol=0)
    assert (out / "README.md").is_file() and "speft_values" in " ".join(load_file(out / "adapter_model.safetensors"))


def test_cli_compose_refuses_adapters_of_different_bases(tmp_path, capsys):
    get_peft_model(base_model(), adapter_config(1)).save_pretrained(tmp_path / "a")
    torch.manual_seed(0)
    wider = tiny_llama().__class__(tiny_llama().config.__class__(
        vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    get_peft_model(wider, adapter_config(2)).save_pretrained(tmp_path / "b")
    assert cli(["compose", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 2
    assert "adapt different modules or shapes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------- hot-swapping
def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in sparse_layers(model).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hot_swap_restores_the_base_bit_for_bit(dtype, monkeypatch):
    model = two_adapter_model().to(dtype)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    original = base_weights(model)
    expected = {}
    for name in ("math", "code"):
        model.set_adapter(name)
        expected[name] = model(input_ids=ids).logits.float()
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    for name in ("math", "code", "math"):
        model.activate_adapter(name)
        assert any(not torch.equal(weight, original[key]) for key, weight in base_weights(model).items())
        with monkeypatch.context() as patched:  # after a swap the forward is the base model's: no sparse kernel
            patched.setattr(hf_speft.layer, "sparse_delta", lambda *args, **kwargs: pytest.fail("sparse kernel ran"))
            torch.testing.assert_close(model(input_ids=ids).logits.float(), expected[name], **tolerance)
    model.activate_adapter(None)
    for key, weight in base_weights(model).items():
        assert torch.equal(weight, original[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hot_swap_to_base_gives_the_base_models_outputs(dtype):
    """"__base__" runs the base model itself, after any swaps (on 814e34d it ran the last adapter, unmerged)."""
    model = two_adapter_model().to(dtype)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model.set_adapter("code")
    code = model(input_ids=ids).logits.float()
    model.set_adapter("math")
    fresh = base_model().to(dtype).eval()
    expected = fresh(input_ids=ids).logits
    model.activate_adapter("math")
    model.activate_adapter("code")
    model.activate_adapter("__base__")
    assert torch.equal(model(input_ids=ids).logits, expected)
    fresh_weights = {name: module.weight for name, module in fresh.named_modules() if hasattr(module, "weight")}
    for key, weight in base_weights(model).items():
        assert torch.equal(weight, fresh_weights[key.removeprefix("base_model.model.")]), key
    model.activate_adapter("code")  # and from the base back to an adapter
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(model(input_ids=ids).logits.float(), code, **tolerance)


def model_state(model):
    """Everything activate_adapter(None) must put back: flags, active adapter, merged and enabled state, weights."""
    layers = sparse_layers(model)
    return {"requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
            "active": model.active_adapter,
            "merged": {name: list(layer.merged_adapters) for name, layer in layers.items()},
            "disabled": {name: layer.disable_adapters for name, layer in layers.items()},
            "weights": base_weights(model)}


def assert_same_state(state, expected):
    assert {key: value for key, value in state.items() if key != "weights"} == {
        key: value for key, value in expected.items() if key != "weights"}
    assert all(torch.equal(weight, expected["weights"][key]) for key, weight in state["weights"].items())


def test_hot_swap_is_for_inference_and_none_puts_back_the_state_before_it():
    """Refused in training mode (on 814e34d it was accepted and the next backward failed), and activate_adapter(None)
    restores what the swaps changed, so training goes on (on 814e34d requires_grad stayed False)."""
    model = two_adapter_model().train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    before = model_state(model)
    assert before["requires_grad"]["base_model.model.model.layers.0.self_attn.q_proj.speft_values.math"]
    with pytest.raises(ValueError, match=r"activate_adapter\('math'\) is for inference, but the model is in training"):
        model.activate_adapter("math")
    assert_same_state(model_state(model), before)
    model.eval()
    expected = model(input_ids=ids).logits
    for name in ("code", "__base__", "math"):
        model.activate_adapter(name)
    model.train()
    with pytest.raises(ValueError, match=r"'math' is hot-swapped in .*activate_adapter\(None\) before training"):
        model(input_ids=ids, labels=ids)
    model.activate_adapter(None)  # allowed in training mode: it is the undo
    assert_same_state(model_state(model), before)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, expected)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.speft_values["math"].grad.abs().sum() > 0 for layer in sparse_layers(model, "math").values())
    model.activate_adapter(None)  # without a swap: nothing to undo
    assert_same_state(model_state(model), before)


def test_activate_adapter_none_merges_again_what_was_merged():
    model = two_adapter_model()
    model.merge_adapter(["code"])
    before = model_state(model)
    model.activate_adapter("math")
    model.activate_adapter(None)
    assert_same_state(model_state(model), before)
    assert all(merged == ["code"] for merged in before["merged"].values())


def test_hot_swap_refusals_leave_the_model_unchanged(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_model().save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_8bit=True), device_map="cpu")
    model = get_peft_model(quantized, adapter_config(1)).eval()
    with pytest.raises(ValueError, match="quantized or sharded"):
        model.activate_adapter("default")
    assert not any(layer.merged for layer in sparse_layers(model).values())
    model = two_adapter_model()
    layer = next(iter(sparse_layers(model).values()))
    layer.get_base_layer().weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match="quantized or sharded"):
        model.activate_adapter("math")
    del layer.get_base_layer().weight.ds_id
    assert not any(layer.merged for layer in sparse_layers(model).values())
    model.add_adapter("hybrid", adapter_config(4, density=None, match_lora_rank=4, lora_r=1))
    model.add_adapter("uncalibrated", adapter_config(5, salience="gradient"))
    original = base_weights(model)
    with pytest.raises(ValueError, match="hybrid"):
        model.activate_adapter("hybrid")
    with pytest.raises(RuntimeError, match="has no mask yet"):
        model.activate_adapter("uncalibrated")
    with pytest.raises(ValueError, match="not SPEFT adapters"):
        model.activate_adapter("nope")
    assert all(torch.equal(weight, original[key]) for key, weight in base_weights(model).items())


# ---------------------------------------------------------------------------------------------- mixed batches
def test_mixed_adapter_generate_matches_each_row_alone():
    model = two_adapter_model()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["code", "__base__", "math"]
    for options in ({"do_sample": False}, {"do_sample": False, "num_beams": 2}):
        mixed = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, **options)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, **options)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, **options)
            assert torch.equal(mixed[row:row + 1], alone), (name, options)


def test_mixed_adapter_batches_refuse_bad_use():
    model = two_adapter_model()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): \['nope'\]"):
        model(input_ids=ids, adapter_names=["math", "nope"])
    with pytest.raises(ValueError, match="3 adapter names for a batch of 2 rows"):
        model(input_ids=ids, adapter_names=["math", "code", "math"])
    model.activate_adapter("math")
    with pytest.raises(ValueError, match="while an adapter is merged"):
        model(input_ids=ids, adapter_names=["math", "code"])
    model.activate_adapter(None)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["math", "code"])


# ----------------------------------------------------------------------------------------------- documentation
DOCUMENTED = [Path(__file__).parents[1] / "README.md", Path(__file__).parents[1] / "docs" / "serving.md"]


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda path: path.name)
def test_serving_examples_run_as_written(path):
    """Every Python example of composing, hot-swapping or mixed batches in the docs runs on a model holding adapters
    `math` and `code` (the setting the docs state), in training mode as `get_peft_model` returns it."""
    blocks = doc_examples(path, "add_weighted_adapter", "activate_adapter", "adapter_names")
    assert blocks
    for block in blocks:
        model = two_adapter_model().train()
        model.generation_config.pad_token_id = 0
        original = model_state(model)
        namespace = {"model": model, "ids": torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(0))}
        run_doc_example(block, path, namespace)
        if "activate_adapter(None)" in block:  # the model as before the swaps (an adapter the block added aside)
            state = model_state(model)
            state["requires_grad"] = {name: flag for name, flag in state["requires_grad"].items()
                                      if name in original["requires_grad"]}
            assert_same_state(state, original)

