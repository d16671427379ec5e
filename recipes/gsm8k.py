"""Fine-tune a causal LM on GSM8K with SPEFT, SPEFT+LoRA, LoRA, PiSSA or full fine-tuning at a matched budget, then
score greedy answers on the test split with lm-eval-harness's two GSM8K metrics (strict-match and flexible-extract).

    python recipes/gsm8k.py --model_name_or_path Qwen/Qwen2-0.5B --method speft --output_dir out/speft
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/gsm8k.py --config cfg.yaml
    python recipes/gsm8k.py --model_name_or_path ./tiny --dataset_path ../shared/data/gsm8k --method lora \\
        --lora_r 8 --eval_limit 50 --output_dir out/lora

Budgets: LoRA and PiSSA train r·(m+n) weights per targeted matrix; SPEFT uses `--match_lora_rank` (default: the same
`--lora_r`), or `--density` / `--num_params`; `speft+lora` (SPEFT's hybrid mode) spends the same budget on a rank
`--hybrid_lora_r` pair (default half of `--lora_r`) plus a sparse mask. Every method prints its trainable count.
Results (metrics, training settings, config, trainable parameters, train time, salience time, peak memory) go to
OUTPUT_DIR/results.json, and every test problem's output and extracted answers to OUTPUT_DIR/predictions.jsonl. On a
machine without a GPU the defaults are `--use_cpu True --bf16 False`; every option is checked before any weight loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import is_deepspeed_zero3_enabled
from tqdm.auto import tqdm
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_quantization_config

import hf_speft
from hf_speft.training.trainer import run_settings
from hf_speft.data import read_jsonl
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipe_utils.py, also when loaded by path
from recipe_utils import (  # noqa: E402
    SPEFT_METHODS, MethodArguments, RecipeError, check_model_and_targets, fixed_subset, peak_memory_bytes,
    peft_config_for, resolve_resume_checkpoint, run_recipe, salience_seconds, train_and_save, train_losses,
    use_cpu_without_a_gpu, user_input_checks,
)

logger = logging.getLogger("gsm8k.py")

PROMPT = "Question: {question}\nAnswer:"
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = [re.compile(pattern) for pattern in (",", r"\$", r"(?s).*#### ", r"\.$")]


@dataclass
class ScriptArguments:
    """What the recipe adds to `MethodArguments` (--method and SPEFT's options), trl's `SFTConfig` and `ModelConfig`
    (which bring `--lora_r`, `--lora_alpha`, `--lora_target_modules`, `--load_in_8bit`, `--load_in_4bit`, ...)."""

    dataset_path: Optional[str] = field(
        default=None, metadata={"help": "Folder with train.jsonl/test.jsonl in GSM8K format (default: the Hub)."})
    dataset_name: str = field(default="openai/gsm8k", metadata={"help": "Hub dataset (config 'main')."})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "Evaluate the first N test problems only."})
    max_train_samples: Optional[int] = field(default=None, metadata={
        "help": "Train on a fixed subset of N problems (the same N in every run, drawn with seed 0)."})
    eval_before: bool = field(default=False, metadata={
        "help": "Also score the test problems before training (metrics_before_training in results.json)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per test problem."})


# ------------------------------------------------------------------------------------------------ data
def read_gsm8k_jsonl(path: str) -> list[dict[str, str]]:
    """Rows of a GSM8K-format jsonl file; a clear error naming the file and line for anything malformed."""
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise RecipeError(f"{path}, line {number}: needs string fields 'question' and 'answer'.")
        if STRICT.search(row["answer"]) is None:
            raise RecipeError(f"{path}, line {number}: the answer has no final '#### <number>' line.")
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise RecipeError(f"{path} holds no problems.")
    return rows


def load_gsm8k(args: ScriptArguments) -> tuple[list[dict], list[dict]]:
    if args.dataset_path:
        return (read_gsm8k_jsonl(os.path.join(args.dataset_path, "train.jsonl")),
                read_gsm8k_jsonl(os.path.join(args.dataset_path, "test.jsonl")))
    data = load_dataset(args.dataset_name, "main")
    return list(data["train"]), list(data["test"])


def prompt_completion(rows: list[dict]) -> Dataset:
    return Dataset.from_list([{"prompt": PROMPT.format(question=row["question"]), "completion": " " + row["answer"]}
                              for row in rows])


# ------------------------------------------------------------------------------------------------ metrics
def normalize(text: str) -> str:
    """lm-eval-harness's GSM8K answer normalisation: drop ',', '$', everything up to '#### ', a final '.'."""
    for pattern in IGNORED:
        text = pattern.sub("", text)
    return text.strip()


def strict_answer(output: str) -> Optional[str]:
    """strict-match: the number after the first '#### '."""
    match = STRICT.search(output)
    return match.group(1) if match else None


def flexible_answer(output: str) -> Optional[str]:
    """flexible-extract: the last number in the output."""
    matches = FLEXIBLE.findall(output)
    if not matches:
        return None
    return next(group for group in matches[-1] if group)


def judged(output: str, answer: str) -> dict:
    """One generated `output` against its GSM8K `answer`: the normalised gold number, both extractions, and whether
    each matches (lm-eval-harness's normalisation)."""
    gold = normalize(answer)
    strict, flexible = strict_answer(output), flexible_answer(output)
    return {"gold": gold, "strict": strict, "flexible": flexible,
            "strict_correct": strict is not None and normalize(strict) == gold,
            "flexible_correct": flexible is not None and normalize(flexible) == gold}


def score(outputs: list[str], answers: list[str]) -> dict[str, float]:
    """strict-match and flexible-extract accuracy of generated `outputs` against GSM8K `answers`, and their mean."""
    records = [judged(output, answer) for output, answer in zip(outputs, answers)]
    strict = sum(record["strict_correct"] for record in records) / len(records)
    flexible = sum(record["flexible_correct"] for record in records) / len(records)
    return {"strict_match": strict, "flexible_extract": flexible, "average": (strict + flexible) / 2}


# ------------------------------------------------------------------------------------------------ methods
def check_arguments(args: ScriptArguments, method: MethodArguments, model_args: ModelConfig) -> None:
    method.check()
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be a positive count, got {args.max_train_samples}.")
    if method.method == "full" and (model_args.load_in_8bit or model_args.load_in_4bit):
        raise ValueError("Full fine-tuning cannot train 8-bit or 4-bit weights; drop --load_in_8bit/--load_in_4bit.")


@torch.no_grad()
def generate_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int,
                     synced_gpus: bool = False, show_progress: bool = True) -> list[str]:
    """Greedy answers to `rows`; `synced_gpus` when every rank must take part in each forward (ZeRO-3)."""
    model.eval()
    tokenizer.padding_side = "left"
    outputs = []
    for start in tqdm(range(0, len(rows), batch_size), desc="generating answers", disable=not show_progress):
        prompts = [PROMPT.format(question=row["question"]) for row in rows[start:start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus)
        outputs += tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return outputs


def predictions(rows: list[dict], outputs: list[str]) -> list[dict]:
    """One record per test problem: question, generated output, and how it was judged (`judged`)."""
    return [{"question": row["question"], "output": output, **judged(output, row["answer"])}
            for row, output in zip(rows, outputs)]


def kbit_device_map() -> Optional[dict]:
    """Quantized weights load on this process's GPU (each rank its own), or on the CPU without one."""
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def card_facts(args: ScriptArguments, results: dict) -> dict:
    """The model card's training block: data, prompt format, settings and the GSM8K scores this run measured."""
    facts = {"data": f"GSM8K ({args.dataset_name if not args.dataset_path else 'a local copy'}), "
                     f"{results['num_train']} training problems",
             "prompt format": "`" + PROMPT.replace("\n", "\\n") + "` followed by the answer (no chat template)",
             **{key.replace("_", " "): value for key, value in results["training"].items() if value is not None}}
    for when, key in (("before training", "metrics_before_training"), ("after training", "metrics")):
        if key in results:
            metrics = results[key]
            facts[f"GSM8K test ({results['num_eval']} problems), {when}"] = (
                f"strict-match {metrics['strict_match']:.3f}, flexible-extract {metrics['flexible_extract']:.3f}")
    return facts


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, MethodArguments, SFTConfig, ModelConfig))
    use_cpu_without_a_gpu(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    args, method, training_args, model_args = make_parser().parse_args_and_config(argv)
    with user_input_checks():  # every option and the data, before any weight is loaded
        check_arguments(args, method, model_args)
        resolve_resume_checkpoint(training_args)
        train_rows, test_rows = load_gsm8k(args)
        peft_config = peft_config_for(method, target_modules=model_args.lora_target_modules or "all-linear",
                                      lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                      lora_dropout=model_args.lora_dropout, task_type="CAUSAL_LM")
        check_model_and_targets(model_args.model_name_or_path, peft_config, AutoModelForCausalLM)
    train_rows = fixed_subset(train_rows, args.max_train_samples)
    test_rows = test_rows[: args.eval_limit] if args.eval_limit else test_rows
    if not torch.cuda.is_available():
        logger.warning("no GPU: training on the CPU in %s", "bf16" if training_args.bf16 else "fp32")

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = get_quantization_config(model_args)
    training_args.model_init_kwargs = {  # trl loads the model from its id or path, as trl's scripts/sft.py does
        "dtype": model_args.dtype or "auto", "attn_implementation": model_args.attn_implementation,
        **({"quantization_config": quantization, "device_map": kbit_device_map()} if quantization else {})}
    trainer_class = hf_speft.SpeftSFTTrainer if method.method in SPEFT_METHODS else SFTTrainer
    trainer = trainer_class(model=model_args.model_name_or_path, args=training_args,
                            train_dataset=prompt_completion(train_rows), processing_class=tokenizer,
                            peft_config=peft_config)
    zero3 = is_deepspeed_zero3_enabled()  # partitioned weights: every rank takes part in each forward
    main_process = trainer.accelerator.is_main_process

    def evaluate() -> tuple[list[str], dict]:
        if not (zero3 or main_process):
            return [], {}
        outputs = generate_answers(trainer.model, tokenizer, test_rows, args.max_new_tokens,
                                   training_args.per_device_eval_batch_size, synced_gpus=zero3,
                                   show_progress=main_process and not training_args.disable_tqdm)
        return outputs, score(outputs, [row["answer"] for row in test_rows])

    before = evaluate()[1] if args.eval_before else None
    train_time, trainable = train_and_save(trainer, method.method)
    outputs, metrics = evaluate()

    results: dict = {}
    if main_process:
        results = {
            "method": method.method,
            "metrics": metrics,
            **({"metrics_before_training": before} if before is not None else {}),
            "num_eval": len(test_rows),
            "num_train": len(train_rows),
            "trainable_params": trainable,
            "train_time_s": train_time,
            "salience_seconds": salience_seconds(trainer),
            "train_losses": train_losses(trainer),
            "peak_memory_bytes": peak_memory_bytes(),
            "world_size": trainer.accelerator.num_processes,
            "training": run_settings(trainer, training_args.max_length),
            "config": {"script": asdict(args), "method": asdict(method), "model": asdict(model_args)},
        }
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        with open(os.path.join(training_args.output_dir, "predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in predictions(test_rows, outputs))
        if method.method in SPEFT_METHODS:  # the adapter's card: how it was trained and what it scored
            hf_speft.update_model_card(training_args.output_dir, training=card_facts(args, results))
        print(json.dumps(results["metrics"]), flush=True)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name="gsm8k")
    trainer.accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    run_recipe(main, "gsm8k.py")
