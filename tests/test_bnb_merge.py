"""The transient merge on bitsandbytes bases (`hf_speft/quantized.py`): exact forward, gradients of the unmerged
path, an untouched quantized weight, nothing weight-sized saved for backward, merges and saving unchanged.

Every layout is forced as in test_bnb.py (never the CPU kind): `standard_layout` / `packed_layout`. A merge reads a
packed weight through `compat.standard_layout_copy`, so the packed tests run a forward on any CPU; their reference is
the same model in the standard layout, whose dequantized weight differs only by the bf16 scales bitsandbytes packs
with (relative 2⁻⁸, test_bnb.py)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_bnb import QUANTIZATION, batch, packed_layout, quantized
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_speft import SparsePeftConfig, sparse_layers
from hf_speft.integrations.bnb import dequantized_weight, is_cpu_packed
from hf_speft.quantized import QuantizedLinear

pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt"), pytest.mark.filterwarnings("ignore:Merging a SPEFT")]
LAYOUTS = ["8bit", "4bit", "4bit_packed"]
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized_model(checkpoint, layout, dtype=torch.float32):
    bits = layout.split("_")[0]
    if dtype == torch.float32:
        config = QUANTIZATION[bits]()
    else:
        config = (BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype))
    model = quantized(checkpoint, bits) if dtype == torch.float32 else AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=config, dtype=dtype, device_map="cpu")
    for module in model.modules():  # standard_layout, also for the bf16 model
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return packed_layout(model) if layout.endswith("packed") else model


def speft(checkpoint, layout, fold_weights, dtype=torch.float32, **config):
    """A SPEFT model with random (non-zero) values on every projection of the quantized base, in training mode (an
    untargeted packed 4-bit layer would drop the input gradient: bitsandbytes' packed kernel has no backward)."""
    options = {"target_modules": ALL_PROJECTIONS, "density": 0.05, "salience": "magnitude", "init_weights": False,
               "fold_weights": fold_weights, **config}
    return get_peft_model(quantized_model(checkpoint, layout, dtype), SparsePeftConfig(**options)).train()


def quantization_tensors(model):
    """Every tensor that holds a quantized weight (data, 4-bit scales, 8-bit CB/SCB), cloned."""
    found = {}
    for name, layer in sparse_layers(model).items():
        weight = layer.get_base_layer().weight
        found[name] = [weight.data.clone()] + [t.clone() for t in (
            getattr(getattr(weight, "quant_state", None), "absmax", None), getattr(weight, "SCB", None),
            getattr(layer.get_base_layer().state, "SCB", None) if hasattr(layer.get_base_layer(), "state") else None)
            if t is not None]
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_merged_forward_is_the_forward_of_the_merged_dequantized_weight(wide_checkpoint, layout, dtype):
    """Bit for bit: x·Wᵀ with W the weight bitsandbytes computes with, in the compute dtype, and
    W[idx] = round(W[idx] + values). W is read here as the base layer's own training product on the identity (exact:
    one non-zero term per output); a packed layer's own kernel runs only on AVX512-BF16 CPUs, so there W is the
    dequantized standard-layout copy (`dequantized_weight`)."""
    model = speft(wide_checkpoint, layout, True, dtype)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    layer = sparse_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    assert isinstance(layer, QuantizedLinear) and layer.merges(x) == "default"
    indices, values = layer.delta_entries("default")
    base = layer.get_base_layer()
    with torch.no_grad():
        weight = (dequantized_weight(base).to(dtype) if layout.endswith("packed") else
                  base(torch.eye(layer.in_features, dtype=dtype)).t().contiguous())
    weight.view(-1)[indices] = (weight.view(-1)[indices].float() + values.float()).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, weight))


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_with_a_zero_delta_the_merge_is_the_bitsandbytes_training_product(wide_checkpoint, bits):
    """Zero values: forward and input gradient are bitsandbytes' own (CPU training product: dequantize + GEMM)."""
    model = speft(wide_checkpoint, bits, True, init_weights=True)
    layer = sparse_layers(model)["base_model.model.model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
    merged = layer(x)
    assert layer.merges(x) == "default"
    grad = torch.randn_like(merged)
    (merged_grad,) = torch.autograd.grad(merged, x, grad)
    own = layer.get_base_layer()(x)
    (own_grad,) = torch.autograd.grad(own, x, grad)
    assert torch.equal(merged, own) and torch.equal(merged_grad, own_grad)


def gradients(model, seed=0):
    """(input-embedding gradient, {values name: gradient}) of one loss.backward()."""
    ids = batch(seed)["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=ids).loss.backward()
    values = {name: p.grad.clone() for name, p in model.named_parameters() if "speft_values" in name}
    return embeds.grad, values


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_the_unmerged_path(wide_checkpoint, layout):
    """The values' and the input's gradients of the merge (and of fold_weights=False on a packed base, which merges
    where x needs a gradient) equal the unmerged path's on the standard layout: within 1e-4 of the largest entry
    (float32 rounding of a different summation order), 3e-2 on the packed layout (its bf16 scales)."""
    reference = speft(wide_checkpoint, layout.split("_")[0], False)
    layers = sparse_layers(reference).values()
    assert not any(layer.merges(torch.ones(1, requires_grad=True)) for layer in layers)
    expected_input, expected_values = gradients(reference)
    tolerance = 3e-2 if layout.endswith("packed") else 1e-4
    for fold_weights in ([True, False] if layout.endswith("packed") else [True]):
        model = speft(wide_checkpoint, layout, fold_weights)
        for name, layer in sparse_layers(model).items():  # the reference's mask and values (magnitude on a packed
            source = sparse_layers(reference)[name]  # weight may pick a few other entries)
            layer.set_mask("default", source.speft_indices["default"], source.speft_values["default"].detach())
        got_input, got_values = gradients(model)
        assert got_values.keys() == expected_values.keys()
        for name, expected in expected_values.items():
            torch.testing.assert_close(got_values[name], expected, rtol=0,
                                       atol=tolerance * expected.abs().max().item(), msg=name)
        torch.testing.assert_close(got_input, expected_input, rtol=0, atol=tolerance * expected_input.abs().max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_leaves_the_quantized_weight_unchanged(wide_checkpoint, layout):
    model = speft(wide_checkpoint, layout, True)
    before = quantization_tensors(model)
    weights = {name: layer.get_base_layer().weight for name, layer in sparse_layers(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, layer in sparse_layers(model).items():
        assert layer.get_base_layer().weight is weights[name]
        assert is_cpu_packed(weights[name]) == layout.endswith("packed")
        after = quantization_tensors(model)[name]
        assert len(after) == len(before[name]) and all(torch.equal(a, b) for a, b in zip(after, before[name]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nothing_weight_sized_is_saved_for_backward(wide_checkpoint, layout):
    """Saved: x (4 tokens) and the O(nnz) indices and values; not the merged weight, nor a dequantized copy."""
    model = speft(wide_checkpoint, layout, True)
    layer = sparse_layers(model)["base_model.model.model.layers.0.mlp.up_proj"]
    x = torch.randn(1, 4, 64, requires_grad=True)
    assert layer.merges(x) == "default"
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    smallest_weight = layer.out_features * layer.in_features // 2  # a 4-bit weight's own bytes
    assert sizes and max(sizes) < smallest_weight, sizes
    out.sum().backward()
    assert x.grad is not None and layer.speft_values["default"].grad is not None


def test_the_choice_of_product(wide_checkpoint):
    """Merged only for one calibrated active adapter that asks for it; "auto" keeps bitsandbytes' own product for a
    no-grad forward of one token; a packed weight whose input needs a gradient always merges (bitsandbytes' packed
    kernel has no backward)."""
    model = speft(wide_checkpoint, "4bit", "auto")
    layer = sparse_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    x, x_grad = torch.randn(2, 64), torch.randn(1, 64, requires_grad=True)
    assert layer.merges(x) == layer.merges(x[:1]) == layer.merges(x_grad) == "default"
    with torch.no_grad():
        assert layer.merges(x) == "default" and layer.merges(x[:1]) is None and layer.merges(x[:1, None]) is None
    with model.disable_adapter():
        assert layer.merges(x_grad) is None
    model.add_adapter("other", SparsePeftConfig(target_modules=ALL_PROJECTIONS, density=0.05,
                                                salience="magnitude", fold_weights=False))
    model.base_model.set_adapter(["default", "other"])
    assert layer.merges(x_grad) is None
    model.base_model.set_adapter("other")  # fold_weights=False
    assert layer.merges(x_grad) is None
    packed = speft(wide_checkpoint, "4bit_packed", False)
    layer = sparse_layers(packed)["base_model.model.model.layers.0.self_attn.q_proj"]
    assert layer.merges(x) is None and layer.merges(x_grad) == "default"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_unmerge_and_save_with_the_transient_merge(wide_checkpoint, layout, tmp_path):
    model = speft(wide_checkpoint, layout, True).eval()
    inputs = {"input_ids": batch(3)["input_ids"]}
    model.save_pretrained(tmp_path)  # (bitsandbytes converts a packed layer back to the standard layout on saving)
    with torch.no_grad():
        adapter_out = model(**inputs).logits
        with model.disable_adapter():
            base_out = model(**inputs).logits
    before = quantization_tensors(model)
    reloaded = PeftModel.from_pretrained(quantized_model(wide_checkpoint, layout), tmp_path).eval()
    assert reloaded.peft_config["default"].fold_weights is True
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapter_out, rtol=0, atol=0)
        with pytest.warns(UserWarning, match="requantizes"):
            model.merge_adapter()
        merged_out = model(**inputs).logits
        assert (merged_out - base_out).abs().max() > 0.1 * (adapter_out - base_out).abs().max()
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs).logits, adapter_out, rtol=0, atol=0)
    after = quantization_tensors(model)
    assert all(torch.equal(a, b) for name in before for a, b in zip(after[name], before[name]))
    with pytest.warns(UserWarning, match="requantizes"):
        unloaded = model.merge_and_unload()
    assert not sparse_layers(unloaded)
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**inputs).logits, merged_out, rtol=0, atol=0)


def test_a_base_forward_between_forward_and_backward_changes_no_gradient(wide_checkpoint):
    """trl's DPO pattern: a reference forward under `disable_adapter()` between the policy forward and its backward.
    The merge keeps nothing in the layer, so the gradients are those of a plain forward and backward."""
    model = speft(wide_checkpoint, "4bit", True)
    expected_input, expected_values = gradients(model)
    model.zero_grad()
    ids = batch()["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=ids).loss
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=ids)
    loss.backward()
    assert torch.equal(embeds.grad, expected_input)
    for name, parameter in model.named_parameters():
        if "speft_values" in name:
            assert torch.equal(parameter.grad, expected_values[name]), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_gradients(wide_checkpoint, reentrant):
    """Checkpointed layers run the merge again in their recomputation (reentrant: the first pass runs without
    gradients); the gradients equal an uncheckpointed step's bit for bit."""
    model = speft(wide_checkpoint, "4bit", True)
    expected_input, expected_values = gradients(model)
    model.zero_grad()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got_input, got_values = gradients(model)
    assert torch.equal(got_input, expected_input)
    assert all(torch.equal(got_values[name], expected) for name, expected in expected_values.items())
