"""`hf-speft salience`: calibrate a mask on data and save a ready-to-train adapter."""

from __future__ import annotations

import argparse
import os

from .common import CliError, builtin_measures, check_local_or_hub

def _texts(data: str) -> list[str]:
    """Training texts from a .jsonl file (text, prompt+completion, question+answer), a .txt file, or a dataset."""
    if os.path.isfile(data):
        if data.endswith(".jsonl"):
            from hf_speft.data import read_jsonl


            return [_row_text(row, f"{data}, line {number}") for number, row in read_jsonl(data)]
        with open(data) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    if os.path.sep in data and not os.path.exists(data):
        raise CliError(f"Data file {data!r} does not exist.")
    from datasets import load_dataset

    try:
        rows = load_dataset(data, split="train")
    except Exception as error:  # noqa: BLE001 - surfaced as one line
        raise CliError(f"Cannot load the dataset {data!r}: {error}") from None
    return [_row_text(row, data) for row in rows]


def _row_text(row: dict, where: str) -> str:
    for fields in (("text",), ("prompt", "completion"), ("question", "answer")):
        if all(field in row for field in fields):
            return "".join(str(row[field]) if i == 0 else " " + str(row[field]) for i, field in enumerate(fields))
    raise CliError(f"{where}: expected a 'text', 'prompt'+'completion' or 'question'+'answer' field; "
                   f"got {sorted(row)}.")


def run(args: argparse.Namespace) -> None:
    check_local_or_hub(args.model, "model")
    from hf_speft.config import SparsePeftConfig  # first: importing hf_speft registers SPEFT with peft
    from hf_speft.hub import summarize_adapter
    from hf_speft.masks import calibrate
    from hf_speft.measures import measure_info

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    budget = {name: getattr(args, name) for name in ("density", "num_params", "match_lora_rank")
              if getattr(args, name) is not None}
    targets = args.target_modules if args.target_modules != ["all-linear"] else "all-linear"
    config = SparsePeftConfig(target_modules=targets, salience=args.measure, salience_batches=args.batches,
                              mask_scope=args.scope, salience_micro_batch_size=args.micro_batch_size, **budget)
    config.check_salience()
    texts = _texts(args.data)
    if not texts:
        raise CliError(f"{args.data!r} holds no text.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    except OSError as error:
        raise CliError(f"Cannot load the model {args.model!r}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), args.batch_size):
        encoded = tokenizer(texts[start:start + args.batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=args.max_length)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        batches.append({**encoded, "labels": labels})
    peft_model = get_peft_model(model, config)
    if not measure_info(args.measure).data_free:  # data-free masks are built inside get_peft_model
        calibrate(peft_model, batches)
    peft_model.save_pretrained(args.out)
    summary = summarize_adapter(args.out)
    print(f"saved a {args.measure}-salience mask of {summary.nnz:,} weights (density {summary.density:.6f}) to "
          f"{args.out}; train it with PeftModel.from_pretrained(base, {args.out!r}, is_trainable=True)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    salience = commands.add_parser(
        "salience", help="calibrate a mask on data and save a ready-to-train adapter",
        epilog="example: hf-speft salience ./base data.jsonl --measure gradient --density 0.005 --out out/mask")
    salience.add_argument("model", help="causal LM folder or Hub id (with its tokenizer)")
    salience.add_argument("data", help=".jsonl (text | prompt+completion | question+answer), .txt, or dataset name")
    measures = builtin_measures()
    salience.add_argument("--measure", default="gradient", choices=measures, metavar="MEASURE",
                          help=f"salience measure, one of: {', '.join(measures)}")
    budget = salience.add_mutually_exclusive_group(required=True)
    budget.add_argument("--density", type=float, help="fraction of the targeted weights to train")
    budget.add_argument("--num_params", type=int, help="number of weights to train")
    budget.add_argument("--match_lora_rank", type=int, help="as many weights as LoRA of this rank")
    salience.add_argument("--target_modules", nargs="+", default=["all-linear"], help="module names to adapt")
    salience.add_argument("--scope", choices=["global", "local"], default="global",
                          help="one top-k over all targets, or the same density in each")
    salience.add_argument("--batches", type=int, default=64, help="salience batches")
    salience.add_argument("--batch_size", type=int, default=16, help="rows per salience batch")
    salience.add_argument("--micro_batch_size", type=int, help="back-propagate each batch in micro-batches of this "
                          "many rows (less memory, the same mask)")
    salience.add_argument("--max_length", type=int, default=512, help="tokens per row (longer rows are truncated)")
    salience.add_argument("--out", required=True, help="folder for the adapter")
    salience.set_defaults(run=run)
