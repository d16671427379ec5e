"""The benchmark tables of the docs, generated from `benchmarks/results/` so they cannot drift from the measurements.

Every table sits in a Markdown file between `<!-- table:NAME -->` and `<!-- /table -->`; this script rewrites those
blocks in README.md, benchmarks/README.md and docs/*.md from the result files, or, for figures the code computes
rather than measures (docs/memory.md's estimates), from the code itself.

    python benchmarks/tables.py           # rewrite the blocks
    python benchmarks/tables.py --check   # exit 1 if a block differs from its results (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

BENCHMARKS = Path(__file__).parent
RESULTS = BENCHMARKS / "results"
ROOT = BENCHMARKS.parent
DOCUMENTS = [ROOT / "README.md", BENCHMARKS / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
sys.path[:0] = [str(BENCHMARKS), str(ROOT)]  # the benchmark modules, and this tree's hf_speft

METHOD_NAMES = {"full": "full fine-tuning", "lora": "peft LoRA r=8", "supertuning": "peft Supertuning",
                "shira": "peft SHiRA", "dense_sim": "dense-masked simulation", "speft": "**hf-speft**",
                "speft_fold": "**hf-speft `fold_weights=True`**",
                "speft_unfolded": "**hf-speft `fold_weights=False`**",
                "speft_static": "SPEFT static (`SpeftSFTTrainer`)", "speft_dynamic": "SPEFT dynamic",
                "lora_trl": "LoRA r=8 (trl `SFTTrainer`)"}
MIB = 2**20


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _medians(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per method, the median over rounds of every numeric field (ratios are per-round ratios to LoRA)."""
    methods: dict[str, list[dict]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    return {method: {key: statistics.median(row[key] for row in members)
                     for key, value in members[0].items()
                     if isinstance(value, (int, float)) and all(row.get(key) is not None for row in members)}
            for method, members in methods.items()}


def _measured_on(rows: list[dict]) -> str:
    """A line naming the machine the rows came from (`harness.machine()`), or naming that it was not recorded."""
    machines = {json.dumps(row.get("machine"), sort_keys=True) for row in rows}
    if len(machines) != 1 or not rows[0].get("machine"):
        return "\n\nMachine: not recorded (or not the same) in every row of these results."
    where = rows[0]["machine"]
    bf16 = "multiplies bf16 natively (AVX512-BF16)" if where["avx512_bf16"] or where["amx"] else "no native bf16"
    return (f"\n\nMachine: {where['cpu']}, {where['cores']} cores, torch {where['torch']} with "
            f"{where['threads']} threads, CPU capability {where['torch_cpu_capability']}, {bf16}.")


def _round_ratios(rows: list[dict], names: dict[str, str] | None = None) -> str:
    """A line giving each method's step ratio to LoRA round by round (the spread behind the medians), each method
    under its table name."""
    methods: dict[str, list[str]] = {}
    for row in rows:
        if row["method"] != "lora":
            methods.setdefault(row["method"], []).append(f"{row['step_time_s/lora']:.2f}")
    names = names or {}
    return "\n\nStep ÷LoRA by round: " + "; ".join(f"{names.get(method, method)} {', '.join(ratios)}"
                                                   for method, ratios in methods.items()) + "."


def memory_speed(name: str) -> str:
    rows = _lines(name)
    medians = _medians(rows)
    lines = ["| method | trainable | step s | step ÷LoRA | no-grad forward ÷LoRA | peak extra RSS ÷LoRA | "
             "optimizer state ÷LoRA | saved-for-backward ÷LoRA |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, row in medians.items():
        lines.append(f"| {METHOD_NAMES.get(method, method)} | {row['trainable_params']:,.0f} | "
                     f"{row['step_time_s']:.3f} | {row['step_time_s/lora']:.2f} | {row['inference_time_s/lora']:.2f} | "
                     f"{row['peak_extra_rss_bytes/lora']:.2f} | {row['optimizer_state_bytes/lora']:.2f} | "
                     f"{row['saved_for_backward_bytes/lora']:.2f} |")
    return "\n".join(lines) + _round_ratios(rows, METHOD_NAMES) + _measured_on(rows)


QUANTIZED_BASES = {"8bit": "8-bit", "4bit": "4-bit", "4bit_packed": "4-bit, packed CPU layout"}
QUANTIZED_METHODS = {"lora": "peft LoRA r=8", "speft_unmerged": "hf-speft unmerged (base product + sparse correction)",
                     "speft_auto": "**hf-speft `fold_weights=\"auto\"`** (transient merge)"}


def quantized() -> str:
    """One row per quantized base and method, from `quantized_<base>.jsonl` (bases not measured are left out)."""
    lines = ["| base | method | step s | step ÷LoRA | no-grad forward ÷LoRA | 1-token forward ÷LoRA | "
             "peak extra RSS ÷LoRA | saved-for-backward ÷LoRA |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for base, base_name in QUANTIZED_BASES.items():
        if not (RESULTS / f"quantized_{base}.jsonl").exists():
            continue
        for method, row in _medians(_lines(f"quantized_{base}.jsonl")).items():
            lines.append(f"| {base_name} | {QUANTIZED_METHODS.get(method, method)} | {row['step_time_s']:.3f} | "
                         f"{row['step_time_s/lora']:.2f} | {row['inference_time_s/lora']:.2f} | "
                         f"{row['decode_time_s/lora']:.2f} | {row['peak_extra_rss_bytes/lora']:.2f} | "
                         f"{row['saved_for_backward_bytes/lora']:.2f} |")
    return "\n".join(lines)


def trainer_run() -> str:
    medians = _medians(_lines("trainer_run.jsonl"))
    lines = ["| method | trainable | step s | step ÷LoRA | peak extra RSS ÷LoRA | salience s | one dynamic update s "
             "(÷ step) | loss first → last |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, row in medians.items():
        update = (f"{row['mask_update_s']:.2f} ({row['mask_update_s'] / row['step_time_s']:.1f})"
                  if row.get("mask_updates") else "—")  # mask_update_s: the median update of a run
        salience = f"{row['salience_s']:.2f}" if row["salience_s"] else "—"
        label = METHOD_NAMES["lora_trl" if method == "lora" else method]
        lines.append(f"| {label} | {row['trainable_params']:,.0f} | {row['step_time_s']:.3f} | "
                     f"{row['step_time_s/lora']:.2f} | {row['peak_extra_rss_bytes/lora']:.2f} | {salience} | {update} "
                     f"| {row['first_loss']:.2f} → {row['last_loss']:.2f} |")
    return "\n".join(lines)


def quality() -> str:
    from quality import markdown_table

    return markdown_table(_json("quality_sst2.json")["summary"])


def quality_sweep() -> str:
    sweep = _json("quality_sst2_sweep.json")
    rates = sorted({run["learning_rate"] for run in sweep["runs"]})
    chosen = _json("quality_sst2.json")["learning_rates"]  # the rates the table uses
    lines = ["| method | " + " | ".join(f"{rate:g}" for rate in rates) + " |", "|---|" + "---:|" * len(rates)]
    methods: dict[str, dict[float, float]] = {}
    for run in sweep["runs"]:
        methods.setdefault(run["method"], {})[run["learning_rate"]] = 100 * run["accuracy"]
    for method, accuracies in methods.items():
        family = method.split("-")[0]
        cells = [("" if rate not in accuracies else f"**{accuracies[rate]:.1f}**"
                  if chosen.get(family) == rate else f"{accuracies[rate]:.1f}") for rate in rates]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def salience_measures() -> str:
    lines = ["| measure | s per batch | ÷ one training step | peak extra RSS | ÷ one training step's |",
             "|---|---:|---:|---:|---:|"]
    for row in _lines("salience.jsonl"):
        if "setting" in row:
            lines.append(f"| {row['method']} | {row['salience_s_per_batch']:.2f} | "
                         f"{row['salience_per_batch/step']:.2f} | {row['peak_extra_rss_bytes'] / MIB:,.0f} MiB | "
                         f"{row['peak_rss/step']:.2f} |")
    return "\n".join(lines)


SETTINGS = {"g1": "whole batches, one group (default)", "g1-m1": "micro-batches of 1 row",
            "g1-m1-bf16": "micro-batches of 1 row, bfloat16 scores", "g2-m1": "micro-batches of 1 row, 2 groups",
            "g4": "whole batches, 4 groups"}


def salience_memory() -> str:
    lines = ["| gradient salience | s per batch | ÷ one training step | peak extra RSS | ÷ one training step's |",
             "|---|---:|---:|---:|---:|"]
    for row in _lines("salience_memory.jsonl"):
        if row["method"] == "gradient":
            lines.append(f"| {SETTINGS.get(row['setting'], row['setting'])} | {row['salience_s_per_batch']:.2f} | "
                         f"{row['salience_per_batch/step']:.2f} | {row['peak_extra_rss_bytes'] / MIB:,.0f} MiB | "
                         f"{row['peak_rss/step']:.2f} |")
    return "\n".join(lines)


def salience_topk() -> str:
    names = {"topk_hf_speft": "hf-speft (`MaskSelector`, running per-layer candidates)",
             "topk_concat": "concatenate + `topk` (reference code)"}
    rows = [row for row in _lines("salience.jsonl") if row["method"] in names]
    lines = [f"| global top-k over {rows[0]['scores'] / 1e6:.0f} M scores | peak extra RSS | ÷ bytes of the scores |",
             "|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {names[row['method']]} | {row['peak_extra_rss_bytes'] / MIB:,.0f} MiB | "
                     f"{row['peak_extra_rss_bytes'] / row['scores_bytes']:.2f} |")
    return "\n".join(lines)


def salience_share() -> str:
    run = _json("salience_share_sst2.json")["runs"][0]
    return "\n".join(["| run | steps' data | calibration s | whole run s | share | dev accuracy |",
                      "|---|---:|---:|---:|---:|---:|",
                      f"| MiniLM, all of SST-2, 3 epochs, `SpeftTrainer` | {run['num_train']:,} sentences | "
                      f"{run['salience_seconds']:.1f} | {run['train_time_s']:,.0f} | "
                      f"{100 * run['salience_seconds'] / run['train_time_s']:.2f}% | {100 * run['accuracy']:.1f}% |"])


def real_model_speed() -> str:
    from real_model import speed_table

    if not (RESULTS / "real_model_speed.jsonl").is_file():
        return speed_table({})
    rows = _lines("real_model_speed.jsonl")
    return speed_table(_medians(rows)) + _round_ratios(rows) + _measured_on(rows)


def real_model_short_run() -> str:
    from real_model import short_run_table

    if not (RESULTS / "real_model_short_run.jsonl").is_file():
        return "Not run yet."
    rows = _lines("real_model_short_run.jsonl")
    return short_run_table(_medians(rows)) + _measured_on(rows)


def quality_lm() -> str:
    """`quality_lm.py`'s tables (SmolLM2 on GSM8K: learning vs forgetting, the rate sweep, the ablation)."""
    from quality_lm import markdown_tables

    if not (RESULTS / "quality_lm.json").is_file():
        return "Not run yet: `python benchmarks/quality_lm.py`."
    return markdown_tables(_json("quality_lm.json"))


def load_time() -> str:
    result = _json("load_time.json")
    median = result["median_seconds"]
    return "\n".join(["| load | median s | ÷ LoRA load |", "|---|---:|---:|",
                      f"| LoRA r=16 (`PeftModel.from_pretrained`) | {median['lora']:.3f} | 1.00 |",
                      f"| SPEFT, same budget (saved masks, no salience) | {median['speft']:.3f} | "
                      f"{median['speft'] / median['lora']:.2f} |",
                      f"| SPEFT, building a new magnitude mask | {median['speft_new_adapter']:.1f} | "
                      f"{median['speft_new_adapter'] / median['lora']:.0f} |"])


def cli_startup() -> str:
    result = _json("cli_startup.json")
    goal = result["goal_seconds"]
    lines = ["| fresh process | median s | goal |", "|---|---:|---|"]
    for name, median in result["median_seconds"].items():
        lines.append(f"| `{name}` | {median:.2f} | {f'≤ {goal:g} s' if name.startswith('hf-speft') else '—'} |")
    return "\n".join(lines)


def serving() -> str:
    lines = ["| model | swap ms: SPEFT / LoRA hot-swap (÷ LoRA) | decode ms/token: base / SPEFT swapped / LoRA "
             "unmerged (SPEFT ÷ base) | mixed batch tokens/s: SPEFT / LoRA (÷ LoRA) | goals met |",
             "|---|---|---|---|---|"]
    for row in _json("serving.json")["results"]:
        swap, decode, mixed = row["swap_s"], row["decode_s_per_token"], row["mixed_tokens_per_s"]
        met = [f"{name.replace('_', ' ')} {goal['goal']}: {'yes' if goal['met'] else 'no'}"
               for name, goal in row["goals"].items()]
        lines.append(f"| {row['model']} ({row['parameters'] / 1e6:.0f} M, {row['speft_nnz']:,} entries) | "
                     f"{1e3 * swap['speft']:.1f} / {1e3 * swap['lora_hotswap']:.1f} ({swap['speft/lora']:.2f}×) | "
                     f"{1e3 * decode['base']:.1f} / {1e3 * decode['speft_swapped']:.1f} / "
                     f"{1e3 * decode['lora_unmerged']:.1f} ({decode['speft/base']:.2f}×) | "
                     f"{mixed['speft']:,.0f} / {mixed['lora']:,.0f} ({mixed['speft/lora']:.2f}×) | {'; '.join(met)} |")
    return "\n".join(lines)


def gpu_check() -> str:
    path = RESULTS / "gpu_check.json"
    if path.is_file():
        from gpu_check import table

        return table(json.loads(path.read_text()))
    return "\n".join(["| measurement | result |", "|---|---|", "| CUDA correctness tests | — (no GPU run yet) |",
                      "| torch sparse kernels in bf16 / fp16 on CUDA | — |",
                      "| each 8B projection shape, fwd+bwd: base / LoRA / SHiRA / Supertuning / SPEFT per kernel "
                      "strategy, and the automatic choice | — |",
                      "| 8B plan: SPEFT and LoRA step time, measured vs estimated memory | — |"])


def kernel_report() -> str:
    from kernel_report import table

    return table(_json("kernel_report.json"))


def kernel_prediction() -> str:
    from kernel_report import prediction_table

    return prediction_table(_json("kernel_report.json"))


def headline() -> str:
    """The README's table: SPEFT against LoRA at the same budget, one line per measured claim."""
    from quality_lm import headline_row

    speed = _medians(_lines("memory_speed_speft.jsonl"))
    quality_rows = {row["method"]: row for row in _json("quality_sst2.json")["summary"]}
    serving_rows = {row["model"]: row for row in _json("serving.json")["results"]}
    speft, lora = quality_rows["speft-gradient"], quality_rows["lora"]
    decode = serving_rows["smollm2-135m"]["decode_s_per_token"]
    return "\n".join([
        "| at LoRA's trainable count (r=8 where a row names no rank) | SPEFT | LoRA | source |", "|---|---:|---:|---|",
        f"| training step time (tiny Llama, CPU) | {speed['speft']['step_time_s/lora']:.2f}× (unfolded: "
        f"{speed['speft_unfolded']['step_time_s/lora']:.2f}×) | 1.00× | `memory_speed.py` |",
        f"| optimizer state / saved-for-backward bytes | {speed['speft']['optimizer_state_bytes/lora']:.2f}× / "
        f"{speed['speft']['saved_for_backward_bytes/lora']:.2f}× | 1.00× / 1.00× | `memory_speed.py` |",
        f"| SST-2 dev accuracy, MiniLM, 3 seeds | {100 * speft['accuracy_mean']:.2f} ± "
        f"{100 * speft['accuracy_std']:.2f} | {100 * lora['accuracy_mean']:.2f} ± {100 * lora['accuracy_std']:.2f} "
        "| `quality.py` |",
        f"| decoding after a hot-swap, SmolLM2-135M, ÷ base model | {decode['speft/base']:.2f}× | "
        f"{decode['lora/base']:.2f}× (unmerged) | `serving.py` |",
        _real_model_headline(),
        *([headline_row(_json("quality_lm.json"))] if (RESULTS / "quality_lm.json").is_file() else []),
    ])


def _real_model_headline() -> str:
    """The README's SmolLM2 row: step time without salience and peak training memory, ÷ LoRA in the same rounds."""
    if not (RESULTS / "real_model_speed.jsonl").is_file():
        from real_model import SPEED_COMMAND

        return ("| training step (salience excluded) / peak memory, SmolLM2-135M, r=16's budget | not yet measured: "
                f"run `{SPEED_COMMAND}` | 1.00× / 1.00× | `real_model.py` |")
    speft = _medians(_lines("real_model_speed.jsonl"))["speft"]
    return (f"| training step (salience excluded) / peak memory, SmolLM2-135M, r=16's budget | "
            f"{speft['step_time_s/lora']:.2f}× / {speft['peak_train_rss_bytes/lora']:.2f}× | 1.00× / 1.00× | "
            "`real_model.py` |")


MEMORY_MODELS = {"llama3_8b": "Llama-3-8B", "qwen2_7b": "Qwen2-7B", "gemma2_2b": "Gemma-2-2B"}
MEMORY_SETTINGS = {"bf16, 1 GPU": {}, "8-bit base, 1 GPU": {"load_in_8bit": True},
                   "ZeRO-3, 4 GPUs (per GPU)": {"zero_stage": 3, "num_gpus": 4}}
MEMORY_METHODS = {"speft": "speft", "speft+lora": "speft+lora (hybrid)", "lora": "lora / pissa", "full": "full"}


def memory_plan() -> str:
    """docs/memory.md's table: `estimate_memory` of the GSM8K recipe configs (computed, not measured: no results file).

    Sequence length, batch, rank, dtype and checkpointing are read from each model's `*_gsm8k_speft.yaml`, so the
    table follows the recipes. PiSSA has LoRA's shapes (the estimate builds it as LoRA), hence one row for both.
    """
    import yaml

    from hf_speft.memory import estimate_memory

    configs = ROOT / "recipes" / "configs"
    lines = ["| model | method | trainable | " + " | ".join(MEMORY_SETTINGS) + " |",
             "|---|---|---:|" + "---:|" * len(MEMORY_SETTINGS)]
    for model, label in MEMORY_MODELS.items():
        recipe = yaml.safe_load((configs / f"{model}_gsm8k_speft.yaml").read_text())
        options = dict(lora_r=recipe["match_lora_rank"], seq_len=recipe["max_length"],
                       batch_size=recipe["per_device_train_batch_size"], dtype=recipe["dtype"],
                       gradient_checkpointing=recipe["activation_checkpointing"])
        for method, method_label in MEMORY_METHODS.items():
            cells, trainable = [], None
            for setting in MEMORY_SETTINGS.values():
                if method == "full" and setting.get("load_in_8bit"):
                    cells.append("— (8-bit weights cannot train)")
                    continue
                estimate = estimate_memory(str(configs / "models" / model), method, **options, **setting)
                trainable = estimate.trainable_params
                cells.append(f"{estimate.total_bytes / 2**30:.1f} GiB")
            lines.append(f"| {label} | {method_label} | {trainable:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {
    "headline": headline, "memory_speed": lambda: memory_speed("memory_speed.jsonl"),
    "memory_speed_speft": lambda: memory_speed("memory_speed_speft.jsonl"),
    "memory_speed_bf16": lambda: memory_speed("memory_speed_bf16.jsonl"), "trainer_run": trainer_run,
    "quality": quality, "quality_sweep": quality_sweep, "salience_measures": salience_measures,
    "salience_memory": salience_memory, "salience_topk": salience_topk, "salience_share": salience_share,
    "real_model_speed": real_model_speed, "real_model_short_run": real_model_short_run, "load_time": load_time,
    "cli_startup": cli_startup, "serving": serving, "quantized": quantized,
    "gpu_check": gpu_check, "kernel_report": kernel_report, "kernel_prediction": kernel_prediction,
    "memory_plan": memory_plan, "quality_lm": quality_lm,
}
BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def rendered(text: str, path: Path) -> str:
    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"{path}: unknown table {name!r}; known: {sorted(TABLES)}")
        return f"{match.group(1)}{TABLES[name]()}\n{match.group(4)}"

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report blocks that differ from the results")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        new = rendered(text, path)
        if new != text:
            stale.append(str(path))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale benchmark tables in {stale}: run python benchmarks/tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
