"""The sparse layer on each device: every test runs on the CPU and, marked `cuda`, on a GPU when one is present
(`pytest -m cuda` selects the GPU half; `benchmarks/gpu_check.py` runs it). Dense references, exact merges, fold mode,
save on one device and load on another, salience across devices, quantized bases."""

from __future__ import annotations

import pytest
import torch
from testing_common import tiny_llama
from peft import PeftModel, get_peft_model

from hf_speft import SparsePeftConfig, compute_salience, sparse_layers

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device on this machine")])]
DTYPES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 3e-2), "fp16": (torch.float16, 3e-3)}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def llama_on(device: str, dtype: torch.dtype = torch.float32, **config):
    torch.manual_seed(0)
    base = tiny_llama().to(device=device, dtype=dtype)
    options = {"target_modules": TARGETS, "density": 0.1, "salience": "magnitude", "init_weights": False, **config}
    return get_peft_model(base, SparsePeftConfig(**options))


def batch(device: str, seed: int = 0) -> dict:
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_layer_forward_and_gradients_match_the_dense_reference(device, dtype_name):
    dtype, tolerance = DTYPES[dtype_name]
    model = llama_on(device, dtype)
    layer = sparse_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    indices = layer.speft_indices["default"].long()
    values = layer.speft_values["default"]
    x = torch.randn(6, 5, layer.in_features, device=device, dtype=dtype, requires_grad=True)
    out = layer(x)
    out.float().square().sum().backward()

    weight = layer.get_base_layer().weight.detach().float().clone()
    delta = torch.zeros_like(weight).view(-1).index_put_((indices,), values.detach().float()).view_as(weight)
    dense = (weight + delta).requires_grad_(True)
    reference_x = x.detach().float().requires_grad_(True)
    reference = reference_x @ dense.t()
    reference.square().sum().backward()
    scale = reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference, atol=tolerance * scale, rtol=tolerance)
    torch.testing.assert_close(x.grad.float(), reference_x.grad, atol=tolerance * reference_x.grad.abs().max().item(),
                               rtol=tolerance)
    expected = dense.grad.view(-1)[indices]
    torch.testing.assert_close(values.grad.float(), expected, atol=tolerance * expected.abs().max().item(),
                               rtol=tolerance)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_merge_unmerge_is_exact_and_fold_mode_matches(device, dtype_name):
    dtype, tolerance = DTYPES[dtype_name]
    inputs = {"input_ids": batch(device)["input_ids"]}
    model = llama_on(device, dtype, fold_weights=False).eval()  # the sparse products' path
    weights = {name: layer.get_base_layer().weight.detach().clone() for name, layer in sparse_layers(model).items()}
    with torch.no_grad():
        unmerged = model(**inputs).logits.float()
        model.merge_adapter()
        merged = model(**inputs).logits.float()
        model.unmerge_adapter()
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, weights[name]), name
    torch.testing.assert_close(merged, unmerged, atol=10 * tolerance * unmerged.abs().max().item(), rtol=0)

    folded = llama_on(device, dtype, fold_weights=True)
    folded.train()
    loss = folded(**batch(device)).loss
    for name in weights:  # the fold exists only inside each layer's own GEMMs
        assert torch.equal(sparse_layers(folded)[name].base_layer.weight, weights[name]), name
    loss.backward()
    assert all(layer.speft_values["default"].grad is not None for layer in sparse_layers(folded).values())
    folded.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(**inputs).logits.float(), unmerged,
                                   atol=10 * tolerance * unmerged.abs().max().item(), rtol=0)
    state = folded.state_dict()
    for name in weights:
        key = name.removeprefix("base_model.model.") + ".base_layer.weight"
        assert torch.equal(state[f"base_model.model.{key}"], weights[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_save_on_the_device_and_load_on_the_cpu(device, tmp_path):
    model = llama_on(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch(device)).loss.backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    inputs = {"input_ids": batch("cpu")["input_ids"]}
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"].to(device)).logits.cpu()
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("measure", ["magnitude", "gradient", "fisher"])
@pytest.mark.parametrize("device", DEVICES)
def test_salience_on_the_device_equals_the_cpu_scores(device, measure):
    data = [batch("cpu", seed) for seed in range(2)]
    scores = {}
    for where in ("cpu", device):
        torch.manual_seed(0)
        model = tiny_llama().to(where)
        scores[where] = compute_salience(model, [{k: v.to(where) for k, v in b.items()} for b in data],
                                         measure=measure, num_batches=2, target_modules=TARGETS, show_progress=False)
    for name, expected in scores["cpu"].items():
        found = scores[device][name].cpu()
        torch.testing.assert_close(found, expected, atol=1e-6 * expected.abs().max().item(), rtol=1e-3)
        top = expected.reshape(-1).topk(50).indices
        assert set(found.reshape(-1).topk(50).indices.tolist()) == set(top.tolist()), name


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_quantized_base_trains(device, bits):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    torch.manual_seed(0)
    base = tiny_llama()
    for parent in base.model.layers:
        for name in ("q_proj", "v_proj"):
            linear = getattr(parent.self_attn, name)
            if bits == "8bit":
                quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                                has_fp16_weights=False)
                quantized.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
            else:
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                              compute_dtype=torch.float32)
                quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False)
            quantized.support_avx512bf16_for_cpu = False  # the standard 4-bit layout whatever the CPU
            setattr(parent.self_attn, name, quantized)
    model = get_peft_model(base.to(device), SparsePeftConfig(target_modules=["q_proj", "v_proj"], density=0.1,
                                                             salience="magnitude"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
