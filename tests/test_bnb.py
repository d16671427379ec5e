"""bitsandbytes 8-bit and 4-bit bases on CPU: training, salience, save/load, merges. Real quantized layers.

bitsandbytes keeps 4-bit weights in one of two layouts depending on the CPU (see `hf_speft.integrations.bnb`): the
standard one, and a packed one for its AVX512-BF16 kernel, which it switches to when a layer first runs in inference.
So nothing here depends on the CPU kind, every test forces its layout: `standard_layout` stops bitsandbytes from
repacking (the forward tests), `packed_layout` repacks every layer up front (the read, mask and merge tests; the
packed kernel itself only runs on AVX512-BF16 CPUs, so those tests never run a forward through a packed layer).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from trainer_helpers import base_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_speft import SparsePeftConfig, calibrate, sparse_layers
from hf_speft.integrations.bnb import dequantized_weight, is_cpu_packed

pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt"), pytest.mark.filterwarnings("ignore:Merging a SPEFT")]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
QUANTIZATION = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    base_model().save_pretrained(folder)
    return folder


def four_bit_layers(model):
    import bitsandbytes as bnb

    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def standard_layout(model):
    """4-bit layers keep the standard layout whatever the CPU: bitsandbytes never repacks them for its CPU kernel."""
    for module in four_bit_layers(model):
        module.support_avx512bf16_for_cpu = False
    return model


def packed_layout(model):
    """Every 4-bit layer in bitsandbytes' packed CPU-kernel layout, as on an AVX512-BF16 CPU after one inference."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for module in four_bit_layers(model):
        weight = module.weight
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
        assert is_cpu_packed(module.weight)
    return model


def quantized(checkpoint, bits):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=QUANTIZATION[bits](),
                                                 device_map="cpu")
    return standard_layout(model)


def batch(seed=0):
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def masks(model):
    return {name: set(layer.speft_indices["default"].tolist()) for name, layer in sparse_layers(model).items()}


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_training_on_a_quantized_base(checkpoint, bits, tmp_path):
    model = get_peft_model(quantized(checkpoint, bits), SparsePeftConfig(
        target_modules=TARGETS, density=0.05, salience="gradient", salience_batches=2))
    calibrate(model, [batch(1), batch(2)], show_progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        name for name, _ in model.named_parameters() if "speft_values" in name}

    model.eval()
    inputs = {"input_ids": batch(3)["input_ids"]}
    with torch.no_grad():
        adapter_out = model(**inputs).logits
        with model.disable_adapter():
            base_out = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(quantized(checkpoint, bits), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapter_out)

        # Merge: dequantize, add, requantize (warned); the delta survives, unmerge restores the base exactly.
        with pytest.warns(UserWarning, match="requantizes"):
            model.merge_adapter()
        merged_out = model(**inputs).logits
        assert (merged_out - base_out).abs().max() > 0.1 * (adapter_out - base_out).abs().max()
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base_out)
        torch.testing.assert_close(model(**inputs).logits, adapter_out)


# On the wide model: bitsandbytes' AVX512 4-bit kernel dequantizes rows shorter than one 64-weight block inaccurately
# (relative error ~0.6 on the 32-wide `checkpoint`, ~0.12 elsewhere), so accuracy is compared only where every target's
# rows span whole blocks, which both CPU kinds dequantize alike.
@pytest.mark.parametrize(("measure", "bits", "minimum_overlap"), [
    ("magnitude", "8bit", 0.95), ("magnitude", "4bit", 0.75), ("gradient", "8bit", 0.95), ("gradient", "4bit", 0.85)])
def test_quantized_masks_agree_with_the_fp32_masks(wide_checkpoint, measure, bits, minimum_overlap):
    config = dict(target_modules=TARGETS, density=0.05, salience=measure, salience_batches=2)
    full = get_peft_model(AutoModelForCausalLM.from_pretrained(wide_checkpoint), SparsePeftConfig(**config))
    low_bit = get_peft_model(quantized(wide_checkpoint, bits), SparsePeftConfig(**config))
    if measure == "gradient":
        for model in (full, low_bit):
            calibrate(model, [batch(1), batch(2)], show_progress=False)
    first, second = masks(full), masks(low_bit)
    total = sum(len(indices) for indices in first.values())
    overlap = sum(len(first[name] & second[name]) for name in first) / total
    print(f"{measure} {bits}: {overlap:.2%} of the fp32 mask kept")
    assert overlap >= minimum_overlap, f"{measure}: only {overlap:.2%} of the fp32 mask is kept on the {bits} base"
    for layer in sparse_layers(low_bit).values():  # not a trivial pattern
        indices = layer.speft_indices["default"].long()
        if indices.numel() > 1:
            assert not torch.equal(indices, torch.arange(indices.numel()))
            assert len(set((indices // layer.in_features).tolist())) > 1


def test_synflow_refuses_quantized_weights(checkpoint):
    with warnings.catch_warnings(), pytest.raises(ValueError, match="quantized"):
        get_peft_model(quantized(checkpoint, "8bit"), SparsePeftConfig(target_modules=TARGETS, density=0.05,
                                                                       salience="synflow"))


def test_hybrid_adapter_on_an_8bit_base_merges_both_parts(checkpoint):
    """The low-rank part of hybrid mode is added by the quantized merge too; unmerge restores the base exactly."""
    model = get_peft_model(quantized(checkpoint, "8bit"), SparsePeftConfig(
        target_modules=TARGETS, match_lora_rank=4, lora_r=2, lora_alpha=64, salience="magnitude",
        init_weights=False)).eval()  # a large low-rank part, well above the requantization noise
    inputs = {"input_ids": batch(3)["input_ids"]}
    with torch.no_grad():
        adapter_out = model(**inputs).logits
        with model.disable_adapter():
            base_out = model(**inputs).logits
        with pytest.warns(UserWarning, match="requantizes"):
            model.merge_adapter()
        merged_out = model(**inputs).logits
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base_out)
        torch.testing.assert_close(model(**inputs).logits, adapter_out)
        for layer in sparse_layers(model).values():  # the sparse part alone
            layer.speft_lora_B["default"].zero_()
        sparse_only_out = model(**inputs).logits
    # Requantizing adds noise; the merged model is still nearer the whole adapter than its sparse part alone.
    assert (merged_out - adapter_out).abs().mean() < 0.5 * (merged_out - sparse_only_out).abs().mean()


@pytest.mark.parametrize("double_quant", [False, True])
def test_packed_4bit_weights_read_like_the_standard_layout(wide_checkpoint, double_quant):
    """A read of a packed weight gives the standard layout's weight (up to the bf16 scales bitsandbytes packs with)
    and changes nothing in the layer."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_use_double_quant=double_quant)
    model = standard_layout(AutoModelForCausalLM.from_pretrained(wide_checkpoint, quantization_config=config,
                                                                 device_map="cpu"))
    standard = [dequantized_weight(layer) for layer in four_bit_layers(model)]
    packed_layout(model)
    for layer, expected in zip(four_bit_layers(model), standard):
        data, absmax = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()
        weight = dequantized_weight(layer)
        assert weight.shape == expected.shape == (layer.out_features, layer.in_features)
        torch.testing.assert_close(weight, expected, rtol=0, atol=2 ** -8 * expected.abs().max().item())
        assert is_cpu_packed(layer.weight)
        assert torch.equal(layer.weight.data, data) and torch.equal(layer.weight.quant_state.absmax, absmax)


def test_magnitude_masks_on_a_packed_4bit_base(wide_checkpoint):
    config = dict(target_modules=TARGETS, density=0.05, salience="magnitude")
    expected = masks(get_peft_model(quantized(wide_checkpoint, "4bit"), SparsePeftConfig(**config)))
    packed = masks(get_peft_model(packed_layout(quantized(wide_checkpoint, "4bit")), SparsePeftConfig(**config)))
    total = sum(len(indices) for indices in expected.values())
    overlap = sum(len(expected[name] & packed[name]) for name in expected) / total
    assert overlap >= 0.98, f"only {overlap:.2%} of the standard layout's mask is kept on the packed layout"


def test_merge_into_a_packed_4bit_base_and_unmerge(wide_checkpoint):
    """Merging dequantizes the packed weight, adds the delta and requantizes; unmerge puts the packed weight back."""
    model = get_peft_model(packed_layout(quantized(wide_checkpoint, "4bit")), SparsePeftConfig(
        target_modules=TARGETS, density=0.05, salience="magnitude", init_weights=False))
    layers = sparse_layers(model)
    before = {name: (layer.get_base_layer().weight, dequantized_weight(layer.get_base_layer()))
              for name, layer in layers.items()}
    with pytest.warns(UserWarning, match="requantizes"):
        model.merge_adapter()
    for name, layer in layers.items():
        base = layer.get_base_layer()
        delta = layer.get_delta_weight("default").float()
        merged = dequantized_weight(base)
        mask = delta != 0
        # The delta survives requantization where it is larger than the 4-bit step.
        shift = (merged - before[name][1])[mask]
        assert (shift * delta[mask] > 0).float().mean() > 0.5
    model.unmerge_adapter()
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        assert weight is before[name][0] and is_cpu_packed(weight)
        torch.testing.assert_close(dequantized_weight(layer.get_base_layer()), before[name][1], rtol=0, atol=0)


def test_the_optional_kernel_notice_of_bitsandbytes_is_dropped(caplog):
    """On AVX512-BF16 CPUs bitsandbytes logs this at import when its optional Hub kernel is absent (the filter is
    installed by `import hf_speft`); its other messages still pass."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                       "`pip install kernels`", "No module named 'kernels'")
        logger.warning("another message")
    assert [record.getMessage() for record in caplog.records] == ["another message"]
