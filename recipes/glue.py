"""Fine-tune a sequence classifier on a GLUE task with SPEFT, SPEFT+LoRA (hybrid), LoRA, PiSSA or full fine-tuning at
a matched budget (as in recipes/gsm8k.py) and report the task's GLUE metrics on the dev split.

    python recipes/glue.py --model_name_or_path prajjwal1/bert-tiny --task sst2 --method speft --output_dir out/sst2
    python recipes/glue.py --model_name_or_path ./minilm --task sst2 --dataset_path ../shared/data/sst2 ...

`--dataset_path DIR` reads DIR/train.{tsv,jsonl} and DIR/dev.{tsv,jsonl} (tsv with a header row) with GLUE's column
names and a `label` column; otherwise `datasets.load_dataset("glue", TASK)`. `--max_train_samples N` trains on a fixed
subset (the same N examples in every run, drawn with seed 0); `--test_file` adds a labelled split evaluated like dev.
The classifier head is trained in every method. Results (metrics, trainable parameters, train time, peak memory,
losses) go to OUTPUT_DIR/results.json.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from datasets import Dataset, load_dataset
from peft import get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)
from trl import TrlParser

import hf_speft
from hf_speft.training.trainer import run_settings
from hf_speft.data import read_jsonl
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipe_utils.py, also when loaded by path
from recipe_utils import (  # noqa: E402
    SPEFT_METHODS, MethodArguments, RecipeError, check_model_and_targets, fixed_subset, peak_memory_bytes,
    peft_config_for, resolve_resume_checkpoint, run_recipe, salience_seconds, train_and_save, train_losses,
    use_cpu_without_a_gpu, user_input_checks,
)

# task -> (text columns, number of labels, metrics)
TASKS = {
    "sst2": (("sentence", None), 2, ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",)),
    "cola": (("sentence", None), 2, ("matthews_correlation",)),
    "qnli": (("question", "sentence"), 2, ("accuracy",)),
    "qqp": (("question1", "question2"), 2, ("accuracy", "f1")),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",)),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
}


@dataclass
class GlueArguments:
    model_name_or_path: str = field(metadata={"help": "Encoder checkpoint (Hub id or folder)."})
    task: str = field(default="sst2", metadata={"help": f"One of {sorted(TASKS)}."})
    dataset_path: Optional[str] = field(default=None, metadata={"help": "Folder with train/dev .tsv or .jsonl."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example."})
    max_train_samples: Optional[int] = field(default=None, metadata={
        "help": "Train on this many examples, the same fixed subset (drawn with seed 0) in every run."})
    test_file: Optional[str] = field(default=None, metadata={
        "help": "A labelled .tsv/.jsonl evaluated like dev (results under test_metrics)."})
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"],
                                      metadata={"help": "Modules adapted by SPEFT/LoRA/PiSSA."})
    lora_r: int = field(default=8, metadata={"help": "LoRA/PiSSA rank, and SPEFT's matched budget by default."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA/PiSSA alpha."})


# ------------------------------------------------------------------------------------------------ data
def read_split(folder: str, split: str, task: str) -> list[dict]:
    """Rows of DIR/<split>.tsv or .jsonl."""
    for extension in ("tsv", "jsonl"):
        path = os.path.join(folder, f"{split}.{extension}")
        if os.path.isfile(path):
            return read_rows(path, task)
    raise RecipeError(f"{os.path.join(folder, split)}.tsv (or .jsonl) does not exist.")


def read_rows(path: str, task: str) -> list[dict]:
    """Rows of a .tsv (header row) or .jsonl file; a clear error naming the file and line for a malformed row."""
    columns = [column for column in TASKS[task][0] if column] + ["label"]
    if not os.path.isfile(path):
        raise RecipeError(f"{path} does not exist.")
    if not path.endswith((".tsv", ".jsonl")):
        raise RecipeError(f"{path}: use a .tsv (with a header row) or .jsonl file.")
    with open(path, newline="") as f:
        if path.endswith(".tsv"):
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [(number, row) for number, row in enumerate(reader, start=2)]
        else:
            rows = list(read_jsonl(path))
    examples = []
    for number, row in rows:
        missing = [column for column in columns if row.get(column) in (None, "")]
        if missing:
            raise RecipeError(f"{path}, line {number}: missing {missing} (task {task} needs {columns}).")
        try:
            label = float(row["label"]) if task == "stsb" else int(row["label"])
        except ValueError:
            raise RecipeError(f"{path}, line {number}: label {row['label']!r} is not a number.") from None
        examples.append({**{column: row[column] for column in columns[:-1]}, "label": label})
    if not examples:
        raise RecipeError(f"{path} holds no examples.")
    return examples


def load_glue(args: GlueArguments) -> tuple[list[dict], dict[str, list[dict]]]:
    """(train rows, {"dev": rows[, "test": rows]}), train cut to the fixed `max_train_samples` subset."""
    if args.dataset_path:
        train, dev = read_split(args.dataset_path, "train", args.task), read_split(args.dataset_path, "dev", args.task)
    else:
        data = load_dataset("glue", args.task)
        train, dev = list(data["train"]), list(data["validation_matched" if args.task == "mnli" else "validation"])
    evaluated = {"dev": dev, **({"test": read_rows(args.test_file, args.task)} if args.test_file else {})}
    return fixed_subset(train, args.max_train_samples), evaluated


# ------------------------------------------------------------------------------------------------ metrics
def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / denominator if denominator else 0.0


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), as Spearman's correlation needs."""
    order = torch.argsort(values)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    for value in torch.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def glue_metrics(task: str, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The task's GLUE metrics: accuracy, binary F1, Matthews correlation, Pearson/Spearman."""
    results = {}
    for name in TASKS[task][2]:
        if name in ("pearson", "spearmanr"):
            x, y = predictions.double(), labels.double()
            results[name] = _pearson(x, y) if name == "pearson" else _pearson(_ranks(x), _ranks(y))
            continue
        tp = int(((predictions == 1) & (labels == 1)).sum())
        tn = int(((predictions == 0) & (labels == 0)).sum())
        fp = int(((predictions == 1) & (labels == 0)).sum())
        fn = int(((predictions == 0) & (labels == 1)).sum())
        if name == "accuracy":
            results[name] = float((predictions == labels).double().mean())
        elif name == "f1":
            results[name] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        else:
            denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            results[name] = (tp * tn - fp * fn) / denominator if denominator else 0.0
    return results


# ------------------------------------------------------------------------------------------------ methods
def check_arguments(args: GlueArguments, method: MethodArguments) -> None:
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r} is not allowed; use one of {sorted(TASKS)}.")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be a positive count, got {args.max_train_samples}.")
    method.check()


def make_parser() -> TrlParser:
    parser = TrlParser((GlueArguments, MethodArguments, TrainingArguments))
    use_cpu_without_a_gpu(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    args, method, training_args = make_parser().parse_args_and_config(argv)
    with user_input_checks():  # every option and the data, before any weight is loaded
        check_arguments(args, method)
        resolve_resume_checkpoint(training_args)
        train_rows, evaluated = load_glue(args)
        peft_config = peft_config_for(method, target_modules=args.target_modules, lora_r=args.lora_r,
                                      lora_alpha=args.lora_alpha, task_type="SEQ_CLS")  # the head trains in all
        check_model_and_targets(args.model_name_or_path, peft_config, AutoModelForSequenceClassification,
                                num_labels=TASKS[args.task][1])
    first, second = TASKS[args.task][0]
    num_labels = TASKS[args.task][1]

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)

    def tokenized(rows: list[dict]) -> Dataset:
        encoded = tokenizer([row[first] for row in rows], [row[second] for row in rows] if second else None,
                            truncation=True, max_length=args.max_length)
        return Dataset.from_dict({**encoded, "labels": [row["label"] for row in rows]})

    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=num_labels)
    common = dict(args=training_args, train_dataset=tokenized(train_rows), eval_dataset=tokenized(evaluated["dev"]),
                  data_collator=DataCollatorWithPadding(tokenizer))
    if method.method in SPEFT_METHODS:
        trainer = hf_speft.SpeftTrainer(model=model, peft_config=peft_config, **common)
    else:
        trainer = Trainer(model=model if peft_config is None else get_peft_model(model, peft_config), **common)
    train_time, trainable = train_and_save(trainer, method.method)

    def evaluate(rows: list[dict]) -> dict[str, float]:
        prediction = trainer.predict(tokenized(rows))
        logits = torch.as_tensor(prediction.predictions)
        predictions = logits.squeeze(-1) if num_labels == 1 else logits.argmax(-1)
        return glue_metrics(args.task, predictions, torch.as_tensor(prediction.label_ids))

    metrics = evaluate(evaluated["dev"])
    results = {"task": args.task, "method": method.method, "metrics": metrics, "num_eval": len(evaluated["dev"]),
               "num_train": len(train_rows), "trainable_params": trainable, "train_time_s": train_time,
               "salience_seconds": salience_seconds(trainer), "peak_memory_bytes": peak_memory_bytes(),
               "train_losses": train_losses(trainer),
               "world_size": trainer.accelerator.num_processes,
               "training": run_settings(trainer, args.max_length),
               "config": {"script": asdict(args), "method": asdict(method)}}
    if "test" in evaluated:
        results.update(test_metrics=evaluate(evaluated["test"]), num_test=len(evaluated["test"]))
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(metrics), flush=True)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=f"glue/{args.task}")
    return results


if __name__ == "__main__":
    run_recipe(main, "glue.py")
