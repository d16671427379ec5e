"""One-command GPU check: the library's correctness on CUDA, every kernel strategy at Llama-3-8B shapes against the
base, LoRA, SHiRA and Supertuning, the automatic kernel choice, and the 8B training step and memory plan. Writes
benchmarks/results/gpu_check.json and prints a table.

    python benchmarks/gpu_check.py          # on a GPU machine (make gpu-check); budget: at most 8 minutes on one H200
    python benchmarks/gpu_check.py --tiny   # the same code on the CPU with tiny shapes (make test runs it)
    python benchmarks/gpu_check.py --sections kernels   # one section again

Sections (each one's failure is recorded and the others still run; the exit code is 1 if any failed):
1. `tests`: `pytest -m cuda tests/test_cuda.py` (forward/gradients against a dense reference in fp32/bf16/fp16, exact
   merge/unmerge, fold mode, save on CUDA and load on the CPU, salience on CUDA equal to the CPU's, quantized bases).
   `--tiny` runs the CPU half of the same file. Counts come from pytest's JUnit XML.
2. `kernel_dtypes`: which torch sparse kernels (CSR `sparse.mm`, `sparse.sampled_addmm`) accept fp32/bf16/fp16 on
   the device, and their error against a dense product.
3. `kernels`: each projection shape of a Llama-3-8B decoder layer (4096×4096 q/o, 1024×4096 k/v, 14336×4096
   gate/up, 4096×14336 down), 4,096 tokens, bf16, forward+backward through peft of the frozen base alone, LoRA r=16,
   peft's SHiRA and Supertuning and SPEFT with every kernel strategy of `hf_speft.ops.KERNELS` (`auto` included), all
   at LoRA r=16's trainable count (random masks): device-event timing after 3 warm-ups, median of 20 runs, peak
   memory above the start; the strategy the automatic choice made for each shape; a strategy that fails records its
   error. `HF_SPEFT_KERNEL` is unset for the run.
4. `plan_8b`: Llama-3-8B (recipes/configs/models/llama3_8b, random bf16 weights), gradient checkpointing, sequence
   1,024, batch 1: a few AdamW steps of SPEFT (`match_lora_rank=16`, all linear layers, gradient salience on random
   tokens, the default kernel choice) and of LoRA r=16; step times, `torch.cuda.max_memory_allocated` and
   `estimate_memory`'s prediction. With bitsandbytes importable, SPEFT on an 8-bit base too (goal: at most 24 GB).
"""


from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = ROOT / "recipes" / "configs" / "models" / "llama3_8b" / "config.json"
FULL = {"shapes": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)], "tokens": 4096, "rank": 16,
        "seq_len": 1024, "steps": 4, "repeats": 20}
TINY = {"shapes": [(64, 64), (16, 64), (224, 64), (64, 224)], "tokens": 128, "rank": 4, "seq_len": 32, "steps": 2,
        "repeats": 3, "config": dict(vocab_size=256, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def section_tests(tiny: bool) -> dict:
    """`pytest -m cuda tests/test_cuda.py` (`--tiny`: its CPU half); counts from pytest's JUnit XML report."""
    import tempfile
    import xml.etree.ElementTree as ElementTree

    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                   str(ROOT / "tests" / "test_cuda.py"), "-m", "not cuda" if tiny else "cuda"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        suite = ElementTree.parse(report).getroot() if report.is_file() else None
    if suite is not None and suite.tag == "testsuites":
        suite = suite[0]
    if suite is None:
        raise RuntimeError(f"pytest wrote no report (exit code {result.returncode}): {result.stderr[-2000:]}")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
               f"{counts['skipped']} skipped")
    if result.returncode != 0 or counts["tests"] == 0:
        raise RuntimeError(f"pytest: {summary} (exit code {result.returncode})\n{result.stdout[-3000:]}")
    return {"summary": summary, **counts}


def section_kernel_dtypes(device: torch.device) -> dict:
    """Which sparse kernels run natively in each dtype here, and how far from the dense product."""
    generator = torch.Generator().manual_seed(0)
    dense = (torch.rand(64, 96, generator=generator) < 0.05) * torch.randn(64, 96, generator=generator)
    right = torch.randn(96, 32, generator=generator)
    left, x = torch.randn(64, 32, generator=generator), torch.randn(32, 96, generator=generator)
    results = {}
    for name, dtype in DTYPES.items():
        csr = dense.to(device=device, dtype=dtype).to_sparse_csr()
        entry = {}
        for kernel, run, reference in (
            ("sparse.mm", lambda: torch.sparse.mm(csr, right.to(device, dtype)), dense @ right),
            ("sampled_addmm", lambda: torch.sparse.sampled_addmm(csr, left.to(device, dtype), x.to(device, dtype),
                                                                 beta=0.0).to_dense(),
             (left @ x) * (dense != 0)),
        ):
            try:
                error = (run().float().cpu() - reference).abs().max().item() / reference.abs().max().item()
                entry[kernel] = {"supported": True, "relative_error": error}
            except RuntimeError as failure:
                entry[kernel] = {"supported": False, "error": str(failure).splitlines()[0][:200]}
        results[name] = entry
    return results


class Projection(torch.nn.Module):
    """One bias-free projection, the module every method of `section_kernels` wraps (peft targets `proj`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                    dtype=weight.dtype)
        self.proj.weight.data.copy_(weight)
        self.proj.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def projection_methods(rank: int, nnz: int, numel: int) -> dict[str, Callable[[], Any] | None]:
    """Method name -> peft config of one projection at LoRA r=`rank`'s trainable count `nnz` (None: the base alone).
    SPEFT runs once per kernel strategy (`speft:<name>`), `auto` included; its random mask is data-free."""
    from peft import LoraConfig, ShiraConfig, SupertuningConfig

    from hf_speft import SparsePeftConfig
    from hf_speft.ops import KERNELS

    methods: dict[str, Callable[[], Any] | None] = {
        "base": None,
        "lora": lambda: LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]),
        "shira": lambda: ShiraConfig(r=rank, target_modules=["proj"]),  # r·(m+n) random entries, like LoRA's count
        # int(numel·(1 - sparsity)) entries: the half keeps float rounding from dropping one
        "supertuning": lambda: SupertuningConfig(sparsity=1 - (nnz + 0.5) / numel, target_modules=["proj"]),
    }
    for kernel in KERNELS:
        methods[f"speft:{kernel}"] = lambda kernel=kernel: SparsePeftConfig(
            target_modules=["proj"], num_params=nnz, salience="random", kernel=kernel,
            fold_weights=False)  # the three sparse products per strategy (the default folds the forward's two)
    return methods


def _time_method(config: Callable[[], Any] | None, weight: torch.Tensor, x: torch.Tensor, device: torch.device,
                 repeats: int) -> dict:
    """Seconds (and on CUDA the peak bytes above the start) of forward+backward of `Projection(weight)` under
    `config`, with the trainable count it trained."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = Projection(weight)
    if config is not None:
        model = get_peft_model(model, config())
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step() -> None:
        model(x).float().sum().backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    entry = {"s": timed(step, device, repeats), "trainable": trainable}
    if device.type == "cuda":
        entry["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - start_bytes
    return entry


def section_kernels(device: torch.device, settings: dict, dtype: torch.dtype) -> dict:
    """Forward+backward of each Llama-3-8B projection shape: the frozen base alone, LoRA r, peft's SHiRA and
    Supertuning and SPEFT with each kernel strategy, all at LoRA r's trainable count; and the strategy the automatic
    choice made for each shape. A method that fails records its error; the others still run."""
    from hf_speft.kernels.choice import bucket
    from hf_speft.ops import kernel_choices

    rank, tokens, rows = settings["rank"], settings["tokens"], []
    for out_features, in_features in settings["shapes"]:
        generator = torch.Generator().manual_seed(0)
        weight = (torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5).to(device, dtype)
        x = torch.randn(tokens, in_features, generator=generator).to(device, dtype).requires_grad_(True)
        nnz = rank * (out_features + in_features)
        row: dict[str, Any] = {"shape": [out_features, in_features], "tokens": tokens, "nnz": nnz, "methods": {},
                               "errors": {}}
        for name, config in projection_methods(rank, nnz, weight.numel()).items():
            try:
                row["methods"][name] = _time_method(config, weight, x, device, settings["repeats"])
            except Exception as error:  # noqa: BLE001 - recorded (e.g. a strategy this device cannot run)
                row["errors"][name] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
            x.grad = None
        # the automatic choice is made per product (forward, input_grad, values_grad) and shape bucket
        row["auto_choice"] = {key.split()[0]: value for key, value in kernel_choices().items()
                              if key == bucket(key.split()[0], x.device, dtype, (out_features, in_features), nnz,
                                               tokens)}
        times = {name: entry["s"] for name, entry in row["methods"].items()}
        if "lora" in times:
            row["ratios_to_lora"] = {name: value / times["lora"] for name, value in times.items()}
        row["predicted_ratios_to_lora"] = _prediction((out_features, in_features), nnz, tokens, rank)
        strategies = {name.split(":", 1)[1]: value for name, value in times.items()
                      if name.startswith("speft:") and name != "speft:auto"}
        row["fastest_strategy"] = min(strategies, key=strategies.get) if strategies else None
        rows.append(row)
        del weight, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dtype": str(dtype).removeprefix("torch."), "rank": rank, "tokens": tokens, "rows": rows}


def _prediction(shape: tuple[int, int], nnz: int, tokens: int, rank: int) -> dict[str, float] | str:
    """benchmarks/kernel_report.py's predicted ratios to LoRA (H200, 790 TFLOP/s) for one projection, printed beside
    the measured ones."""
    try:
        from kernel_report import predicted_ratios

        return predicted_ratios(shape, nnz, tokens, rank)
    except ImportError as error:  # the model reads the Triton strategy's block sizes: no Triton, no prediction
        return f"no prediction: {error}"


def _llama(settings: dict, device: torch.device, dtype: torch.dtype, tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**settings["config"]) if tiny else LlamaConfig.from_json_file(LLAMA3_8B)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # the GPU machine's transformers may predate the new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model, config


def _train_steps(model, device: torch.device, settings: dict, vocab: int) -> dict:
    from hf_speft import MaskUpdater

    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, vocab, (1, settings["seq_len"]), generator=generator)
                              .to(device)), "labels": ids} for _ in range(2)]
    result = {}
    if any("speft_" in name for name, _ in model.named_parameters()):
        updater = MaskUpdater(model, batches, show_progress=False)
        start = time.perf_counter()
        updater.calibrate()
        result["salience_s"] = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for step in range(settings["steps"]):
        start = time.perf_counter()
        model(**batches[step % 2]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result["step_s"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def section_plan(device: torch.device, settings: dict, tiny: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    from hf_speft import SparsePeftConfig, estimate_memory

    dtype = torch.float32 if tiny else torch.bfloat16
    results = {}
    methods = {"lora": lambda: LoraConfig(r=settings["rank"], target_modules="all-linear"),
               "speft": lambda: SparsePeftConfig(target_modules="all-linear", match_lora_rank=settings["rank"],
                                                 salience="gradient", salience_batches=2)}
    for method, config in methods.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, model_config = _llama(settings, device, dtype, tiny)
        model = get_peft_model(model, config())
        entry = _train_steps(model, device, settings, model_config.vocab_size)
        estimate = estimate_memory(model_config, method, lora_r=settings["rank"], seq_len=settings["seq_len"],
                                   batch_size=1, dtype=str(dtype).removeprefix("torch."))
        entry["estimated_bytes"] = estimate.total_bytes
        if device.type == "cuda":
            entry["max_memory_allocated"] = torch.cuda.max_memory_allocated()
            entry["estimate/measured"] = entry["estimated_bytes"] / entry["max_memory_allocated"]
        results[method] = entry
        del model
    results["speft/lora_step"] = results["speft"]["step_s"] / results["lora"]["step_s"]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        results["speft_8bit"] = {"skipped": "bitsandbytes is not importable here"}
        return results
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, model_config = _llama(settings, device, dtype, tiny)
    model = get_peft_model(_linear_layers_in_8bit(model, device), methods["speft"]())
    entry = _train_steps(model, device, settings, model_config.vocab_size)
    entry["estimated_bytes"] = estimate_memory(model_config, "speft", lora_r=settings["rank"], load_in_8bit=True,
                                               seq_len=settings["seq_len"], batch_size=1,
                                               dtype=str(dtype).removeprefix("torch.")).total_bytes
    if device.type == "cuda":
        entry["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        entry["goal_24GB_met"] = entry["max_memory_allocated"] <= 24 * 10**9
    results["speft_8bit"] = entry
    return results


def _linear_layers_in_8bit(model, device: torch.device):
    """The decoder layers' linear layers as bitsandbytes `Linear8bitLt` (as `load_in_8bit` makes them; the output head
    stays), quantized one at a time on the way to `device`."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                                has_fp16_weights=False)
                quantized.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu", torch.float16),
                                                     requires_grad=False, has_fp16_weights=False)
                setattr(parent, name, quantized.to(device))
    return model


SECTIONS = ("tests", "kernel_dtypes", "kernels", "plan_8b")


def run(tiny: bool, sections: tuple[str, ...] = SECTIONS) -> dict:
    """Every section in `sections` (each failure recorded, the others still run) and the automatic kernel choices
    made meanwhile. `HF_SPEFT_KERNEL` is unset for the run, so each strategy is timed as asked."""
    import os

    import peft
    import transformers

    from hf_speft.ops import kernel_choices

    ignored = os.environ.pop("HF_SPEFT_KERNEL", None)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    settings = TINY if tiny else FULL
    kernel_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                    "mode": "tiny" if tiny else "full", "date": time.strftime("%Y-%m-%d"),
                    "ignored_HF_SPEFT_KERNEL": ignored, "sections": {}}
    runners = {"tests": lambda: section_tests(tiny), "kernel_dtypes": lambda: section_kernel_dtypes(device),
               "kernels": lambda: section_kernels(device, settings, kernel_dtype),
               "plan_8b": lambda: section_plan(device, settings, tiny)}
    begin = time.perf_counter()
    for name in sections:
        start = time.perf_counter()
        try:
            report["sections"][name] = {"ok": True, **runners[name]()}
        except Exception as error:  # noqa: BLE001 - recorded, the other sections still run
            report["sections"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                                        "traceback": traceback.format_exc()[-4000:]}
        report["sections"][name]["seconds"] = time.perf_counter() - start
        print(f"{name}: {'ok' if report['sections'][name]['ok'] else 'FAILED'} "
              f"({report['sections'][name]['seconds']:.1f}s)", flush=True)
    report["kernel_choices"] = dict(kernel_choices())
    report["seconds"] = time.perf_counter() - begin
    return report


def _ms(entry: dict | None) -> str:
    return f"{entry['s'] * 1e3:.2f}" if entry else "failed"


def _measured_and_predicted(row: dict) -> str:
    """'; ÷ LoRA measured / predicted: triton a / b, dense c / d' for a `kernels` row with a prediction."""
    predicted, measured = row.get("predicted_ratios_to_lora"), row.get("ratios_to_lora", {})
    if not isinstance(predicted, dict):
        return ""
    pairs = {"triton": "triton kernels, unfolded", "dense": "dense strategy, unfolded"}
    return "; ÷ LoRA measured / predicted: " + ", ".join(
        f"{name} {measured[f'speft:{name}']:.2f} / {predicted[path]:.2f}" if f"speft:{name}" in measured
        else f"{name} — / {predicted[path]:.2f}" for name, path in pairs.items())


def table(report: dict) -> str:
    """The Markdown rows the docs show: one per measurement."""
    sections = report["sections"]
    lines = [f"GPU check on {report['device']} ({report['mode']}, torch {report['torch']}, "
             f"{report.get('seconds', 0):.0f} s, {report['date']})", "",
             "| measurement | result |", "|---|---|"]
    tests = sections.get("tests", {})
    lines.append(f"| CUDA correctness tests | {tests.get('summary', tests.get('error', '—').splitlines()[0])} |")
    for dtype, kernels in sections.get("kernel_dtypes", {}).items():
        if isinstance(kernels, dict):
            support = ", ".join(f"{k} {'yes' if v.get('supported') else 'no'}" for k, v in kernels.items())
            lines.append(f"| torch sparse kernels in {dtype} | {support} |")
    kernels = sections.get("kernels", {})
    for row in kernels.get("rows", []):
        methods = row["methods"]
        strategies = [name for name in methods if name.startswith("speft:") and name != "speft:auto"]
        choice = ", ".join(f"{product} {name}" for product, name in row["auto_choice"].items()) or "nothing"
        auto = methods.get("speft:auto")
        ratio = f" = {row['ratios_to_lora']['speft:auto']:.2f}× LoRA" if auto and "ratios_to_lora" in row else ""
        lines.append(
            f"| {row['shape'][0]}×{row['shape'][1]}, {row['tokens']} tokens, {kernels['dtype']}, fwd+bwd ms: base / "
            f"LoRA / SHiRA / Supertuning / SPEFT auto | {_ms(methods.get('base'))} / {_ms(methods.get('lora'))} / "
            f"{_ms(methods.get('shira'))} / {_ms(methods.get('supertuning'))} / {_ms(auto)} (chose {choice}{ratio}); "
            + ", ".join(f"{name.removeprefix('speft:')} {_ms(methods[name])}" for name in strategies)
            + "".join(f"; {name} failed" for name in row["errors"]) + _measured_and_predicted(row) + " |")
    plan = sections.get("plan_8b", {})
    for method in ("lora", "speft"):
        entry = plan.get(method)
        if entry:
            memory = entry.get("max_memory_allocated")
            measured = f"{memory / 2**30:.1f} GiB measured, " if memory else ""
            lines.append(f"| 8B plan, {method}: step, memory | {entry['step_s']:.2f} s/step, {measured}"
                         f"{entry['estimated_bytes'] / 2**30:.1f} GiB estimated |")
    if "speft/lora_step" in plan:
        lines.append(f"| 8B plan: SPEFT step ÷ LoRA step | {plan['speft/lora_step']:.2f} |")
    eight_bit = plan.get("speft_8bit", {})
    if "step_s" in eight_bit:
        memory = eight_bit.get("max_memory_allocated")
        lines.append(f"| 8B plan, SPEFT on an 8-bit base | {eight_bit['step_s']:.2f} s/step"
                     + (f", {memory / 2**30:.1f} GiB measured (goal ≤ 24 GB: "
                        f"{'met' if eight_bit['goal_24GB_met'] else 'missed'})" if memory else "") + " |")
    elif eight_bit:
        lines.append(f"| 8B plan, SPEFT on an 8-bit base | {eight_bit.get('skipped')} |")
    for name, section in sections.items():
        if not section["ok"]:
            lines.append(f"| section {name} | FAILED: {section['error'].splitlines()[0][:200]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="run the same code on the CPU with tiny shapes")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="run only these sections (default: all)")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/gpu_check.json; "
                                                       "--tiny: gpu_check_tiny.json in the current folder)")
    args = parser.parse_args()
    report = run(args.tiny, tuple(args.sections))
    output = Path(args.output or (Path("gpu_check_tiny.json") if args.tiny
                                  else ROOT / "benchmarks" / "results" / "gpu_check.json"))
    output.write_text(json.dumps(report, indent=2, default=lambda value: None if isinstance(value, float)
                                 and math.isnan(value) else str(value)) + "\n")
    print(table(report))
    sys.exit(0 if all(section["ok"] for section in report["sections"].values()) else 1)


if __name__ == "__main__":
    main()
