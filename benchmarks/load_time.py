"""Adapter load time: `PeftModel.from_pretrained` of a saved SPEFT adapter against a LoRA of the same budget, on
Llama-3-8B's decoder-layer shapes (recipes/configs/models/llama3_8b, `--layers` of its 32 layers, random bf16
weights, all seven projections targeted), measured in the same run, interleaved, median of `--repeats`.

Loading reads the saved masks and runs no salience measure; `get_peft_model` (a new adapter, whose data-free
magnitude mask is a global top-k over every targeted weight) is timed beside it to show the work loading skips.

    python benchmarks/load_time.py            # writes benchmarks/results/load_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import LLAMA_PROJECTIONS
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_speft

ROOT = Path(__file__).resolve().parents[1]


def base_model(layers: int) -> torch.nn.Module:
    config = LlamaConfig.from_json_file(ROOT / "recipes/configs/models/llama3_8b/config.json")
    config.num_hidden_layers, config.vocab_size = layers, 1024  # the embeddings do not matter here
    torch.manual_seed(0)
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            return LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(torch.float32)


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/load_time.json"))
    args = parser.parse_args()

    configs = {
        "lora": lambda: LoraConfig(r=args.rank, target_modules=LLAMA_PROJECTIONS),
        "speft": lambda: hf_speft.SparsePeftConfig(target_modules=LLAMA_PROJECTIONS, match_lora_rank=args.rank,
                                                   salience="magnitude", init_weights=False),
    }
    model = base_model(args.layers)
    times: dict[str, list[float]] = {"lora": [], "speft": [], "speft_new_adapter": []}
    with tempfile.TemporaryDirectory() as folder:
        for method, config in configs.items():
            peft_model = get_peft_model(model, config())
            peft_model.save_pretrained(f"{folder}/{method}")
            peft_model.unload()
        for _ in range(args.repeats):
            for method in configs:
                loaded = []
                times[method].append(seconds(lambda: loaded.append(  # noqa: B023
                    PeftModel.from_pretrained(model, f"{folder}/{method}"))))
                loaded[0].unload()
            fresh = []
            times["speft_new_adapter"].append(seconds(lambda: fresh.append(  # noqa: B023
                get_peft_model(model, configs["speft"]()))))
            fresh[0].unload()
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "setting": {"model": "llama3_8b shapes", "layers": args.layers, "dtype": "bfloat16",
                    "targets": LLAMA_PROJECTIONS,
                    "budget": f"LoRA r={args.rank} (SPEFT match_lora_rank={args.rank}, magnitude)",
                    "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "seconds": times,
        "median_seconds": median,
        "speft_load_over_lora_load": median["speft"] / median["lora"],
        "speft_new_adapter_over_speft_load": median["speft_new_adapter"] / median["speft"],
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in ("median_seconds", "speft_load_over_lora_load",
                                                    "speft_new_adapter_over_speft_load")}, indent=2))


if __name__ == "__main__":
    main()
