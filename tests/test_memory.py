"""estimate_memory: exact counts and state bytes against real models, activations within 20% of measured peaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from hf_speft.methods import method_peft_config
from hf_speft import estimate_memory, sparse_layers
from hf_speft_cli import main as cli_main
from hf_speft.ops import SparsePattern

MODELS = Path(__file__).parents[1] / "recipes" / "configs" / "models"
TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=2048, max_position_embeddings=256)
PEAK_SCRIPT = Path(__file__).parent / "workers" / "memory_peak_worker.py"


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def trained_one_step(method: str, config: LlamaConfig):
    """A real tiny model of `method` after one AdamW step, and its optimizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    peft_config = method_peft_config(method, target_modules="all-linear", lora_r=8, salience="magnitude")
    if peft_config is not None:  # the method's adapter at LoRA r=8's budget, as estimate_memory builds it
        model = get_peft_model(model, peft_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("method", ["speft", "speft+lora", "lora", "full"])
def test_counts_and_state_bytes_match_a_real_model(method):
    config = tiny_config()
    model, optimizer = trained_one_step(method, config)
    estimate = estimate_memory(config, method, dtype="float32")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert estimate.trainable_params == sum(p.numel() for p in trainable)
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                  if t.dim() > 0)
    assert estimate.optimizer_bytes == moments
    assert estimate.gradient_bytes == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "speft_" not in name)
    assert estimate.base_weight_bytes == frozen + (sum(p.numel() * 4 for p in trainable) if method == "full" else 0)
    if method.startswith("speft"):  # values (+ the hybrid's low-rank pair) + what the layers hold to index them
        layers = sparse_layers(model, "default").values()
        held = sum(layer.speft_values["default"].numel() * 4 + index_state_bytes(layer) for layer in layers)
        held += sum(p.numel() * 4 for n, p in model.named_parameters() if "speft_lora_" in n)
        assert estimate.adapter_bytes == held


def tensors_of(holder) -> list[torch.Tensor]:
    """The tensors an object's attributes hold, directly or in a tuple."""
    values = [v for value in vars(holder).values() for v in (value if isinstance(value, tuple) else (value,))]
    return [value for value in values if isinstance(value, torch.Tensor)]


def index_state_bytes(layer) -> int:
    """Bytes of the distinct storages a trained layer holds to index its delta: the index buffer, the cached CSR
    layouts and the fold's storage positions (which, for an nn.Linear, are the index buffer itself)."""
    tensors = [layer.speft_indices["default"], *(positions for _, positions in layer._positions.values())]
    tensors += [tensor for pattern in layer._patterns.values() for tensor in tensors_of(pattern)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}.values())


def test_sparse_layout_bytes_formula_matches_the_layout():
    indices = torch.randperm(48 * 40)[:300].sort().values.int()
    pattern = SparsePattern(indices, 48, 40)
    assert pattern.indices is indices  # the layer's buffer, not a copy

    def held() -> int:
        return sum(t.numel() * t.element_size() for t in tensors_of(pattern) if t is not indices)

    assert SparsePattern.state_bytes(300, 48, 40) == held() + 300 * 4  # + the layer's index buffer
    pattern.layout_for(input_grad=False)  # a fold's values' gradient, a forward: Δᵀ's layout is not derived
    assert SparsePattern.state_bytes(300, 48, 40) == held() + 300 * 4
    pattern.layout_for(input_grad=True)  # an unfolded layer's input gradient derives it once
    assert SparsePattern.state_bytes(300, 48, 40, transposed=True) == held() + 300 * 4


def test_a_folded_linear_layer_holds_no_copy_of_its_indices():
    model, _ = trained_one_step("speft", tiny_config())
    for layer in sparse_layers(model, "default").values():
        indices = layer.speft_indices["default"]
        assert all(positions is indices for _, positions in layer._positions.values())
        assert index_state_bytes(layer) == SparsePattern.state_bytes(indices.numel(), *layer._patterns["default"].shape)


@pytest.mark.parametrize(("folder", "published"), [("llama3_8b", 8_030_261_248), ("qwen2_7b", 7_615_616_512),
                                                   ("gemma2_2b", 2_614_341_888)])
def test_shipped_model_configs_have_the_published_size(folder, published):
    full = estimate_memory(str(MODELS / folder), "full", seq_len=8)
    assert full.trainable_params == published
    assert full.base_weight_bytes - 2 * published < 2**20  # bfloat16 weights (and the rotary buffers)
    speft, lora = (estimate_memory(str(MODELS / folder), method, seq_len=8) for method in ("speft", "lora"))
    assert speft.trainable_params == lora.trainable_params  # match_lora_rank=8 by default


def test_sharding_and_quantization_arithmetic():
    config = tiny_config()
    plain = estimate_memory(config, "speft", dtype="float32")
    zero3 = estimate_memory(config, "speft", dtype="float32", zero_stage=3, num_gpus=4)
    assert zero3.base_weight_bytes == plain.base_weight_bytes // 4
    assert zero3.optimizer_bytes == plain.optimizer_bytes // 4 and zero3.gradient_bytes == plain.gradient_bytes // 4
    assert zero3.activation_bytes == plain.activation_bytes  # activations are per GPU batch
    zero1 = estimate_memory(config, "full", dtype="float32", zero_stage=1, num_gpus=2)
    full = estimate_memory(config, "full", dtype="float32")
    assert zero1.optimizer_bytes == full.optimizer_bytes // 2 and zero1.gradient_bytes == full.gradient_bytes
    full_zero3 = estimate_memory(config, "full", dtype="float32", zero_stage=3, num_gpus=4)
    assert full_zero3.base_weight_bytes == full.base_weight_bytes // 4 and full_zero3.adapter_bytes == 0
    for estimate in (plain, zero3, zero1, full, full_zero3):
        parts = [estimate.base_weight_bytes, estimate.adapter_bytes, estimate.gradient_bytes,
                 estimate.optimizer_bytes, estimate.activation_bytes]
        assert min(parts) >= 0 and estimate.total_bytes == sum(parts)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_base_bytes_match_a_real_bitsandbytes_model(tmp_path, bits):
    from transformers import BitsAndBytesConfig

    config = tiny_config(hidden_size=256, intermediate_size=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu",
                                                 dtype=torch.float32)
    held = model.get_memory_footprint()  # parameters and buffers; the quantization scales live beside them
    for module in model.modules():
        weight = getattr(module, "weight", None)
        scale = getattr(weight, "SCB", None) if bits == "8bit" else getattr(getattr(weight, "quant_state", None),
                                                                            "absmax", None)
        held += scale.numel() * scale.element_size() if scale is not None else 0
    estimate = estimate_memory(config, "speft", dtype="float32", **{f"load_in_{bits}": True})
    assert estimate.base_weight_bytes == held


def test_bad_arguments_name_the_value():
    config = tiny_config()
    for kwargs, message in [({"method": "adapter"}, "method='adapter'"), ({"zero_stage": 4}, "zero_stage=4"),
                            ({"num_gpus": 0}, "num_gpus=0"), ({"dtype": "int8"}, "dtype='int8'"),
                            ({"method": "full", "load_in_8bit": True}, "Full fine-tuning"),
                            ({"load_in_8bit": True, "zero_stage": 3}, "ZeRO-3"),
                            ({"method": "lora", "density": 0.1}, "lora uses lora_r"),
                            ({"density": 2.0}, "density"), ({"num_params": 10**12}, "only")]:
        with pytest.raises(ValueError, match=message):
            estimate_memory(config, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "checkpointing"), [("speft", False), ("speft", True), ("speft+lora", False),
                                                       ("lora", False), ("full", False)])
def test_activation_estimate_within_20_percent_of_the_measured_peak(method, checkpointing):
    """The peak RSS growth of a real training step on CPU (fp32) against the activation estimate."""
    out = subprocess.run([sys.executable, str(PEAK_SCRIPT), method, str(checkpointing)], capture_output=True,
                         text=True, check=True, env={"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""})
    measured = json.loads(out.stdout.strip().splitlines()[-1])["step_peak_bytes"]
    config = AutoConfig.for_model("llama", **json.loads(out.stdout.strip().splitlines()[-1])["config"])
    estimate = estimate_memory(config, method, dtype="float32", seq_len=256, batch_size=4,
                               gradient_checkpointing=checkpointing)
    assert estimate.activation_bytes == pytest.approx(measured, rel=0.2)


def test_estimate_cli(capsys):
    assert cli_main(["estimate", str(MODELS / "qwen2_7b"), "--methods", "speft", "lora", "--load_in_8bit",
                     "--seq_len", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in rows] == ["speft", "lora"]
    assert rows[0]["total_bytes"] == sum(rows[0][part] for part in ("base_weight_bytes", "adapter_bytes",
                                                                    "gradient_bytes", "optimizer_bytes",
                                                                    "activation_bytes"))
    assert rows[0]["base_weight_bytes"] < 0.6 * estimate_memory(str(MODELS / "qwen2_7b"), seq_len=64).base_weight_bytes
    assert cli_main(["estimate", str(MODELS / "qwen2_7b"), "--num_gpus", "0"]) == 2
    assert "num_gpus=0" in capsys.readouterr().err
