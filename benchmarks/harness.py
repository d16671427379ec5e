"""What every benchmark here shares: a peak-RSS sampler, the kernel's peak RSS growth of a block, and interleaved
rounds of one fresh subprocess per method with every figure also given as a ratio to LoRA measured in the same
round."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable


def machine() -> dict:
    """The machine a figure came from: CPU model, cores and threads, torch's CPU capability and whether the CPU
    multiplies bf16 natively (AVX512-BF16, AMX), which sets bf16's speed against fp32's."""
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor())
    flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    return {"cpu": model, "cores": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples the resident set size in a thread; `peak` is the largest value seen."""

    def __init__(self) -> None:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure_training(model, args) -> dict:
    """Train `model` `args.warmup + args.steps` AdamW steps on one fixed batch of `args.batch x args.seq_len` tokens
    (median step time over the last `args.steps`), then time `args.steps` no-grad forwards of that batch. Also the
    bytes saved for backward, the peak RSS growth while training and the optimizer state. Every training benchmark
    measures a method this way, so their figures compare."""
    import torch

    from hf_speft.memory import saved_for_backward_bytes

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, VOCAB_SIZE, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    saved_bytes = saved_for_backward_bytes(model, batch)
    rss_before = rss_bytes()
    times = []
    with PeakRss() as rss:
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    optimizer_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(args.steps):
            model(input_ids=ids)
        inference = (time.perf_counter() - start) / args.steps
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "step_time_s": statistics.median(times),
        "inference_time_s": inference,
        "peak_extra_rss_bytes": rss.peak - rss_before,
        "optimizer_state_bytes": optimizer_bytes,
        "saved_for_backward_bytes": saved_bytes,
    }


def process_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


class PeakGrowth:
    """The kernel's peak resident set (VmHWM, reset on entry) above the resident set on entry: `extra` bytes."""

    def __enter__(self):
        self.before = process_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc) -> None:
        self.extra = process_status("VmHWM") - self.before


# what every benchmark targets: the seven projections of a Llama block
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_LLAMA_ARGUMENTS = ["steps", "warmup", "hidden", "layers", "batch", "seq_len"]  # what workers are passed
VOCAB_SIZE = 8192


def add_tiny_llama_arguments(parser: argparse.ArgumentParser, *, hidden: int, layers: int, seq_len: int) -> None:
    """The training run (`measure_training`) and the tiny Llama (`tiny_llama_config`) a benchmark's workers build."""
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=seq_len)


def tiny_llama_config(args: argparse.Namespace, num_attention_heads: int, num_key_value_heads: int):
    """A Llama of `add_tiny_llama_arguments`' shape (the MLP 2.75x the hidden size, as Llama's)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                       num_hidden_layers=args.layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_key_value_heads, max_position_embeddings=args.seq_len)


def parser_for(doc: str, methods: list[str], output_name: str) -> argparse.ArgumentParser:
    """The arguments every benchmark has: --methods, --rounds, --output and the hidden --worker."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / output_name))
    parser.add_argument("--worker", choices=methods, help=argparse.SUPPRESS)
    return parser


def run(parser: argparse.ArgumentParser, script: str, worker: Callable, passthrough: list[str],
        ratio_fields: list[str]) -> tuple[argparse.Namespace, list[dict[str, dict]]]:
    """Parse; as a worker, print `worker(method, args)` as JSON and exit. Otherwise run the rounds (each method in a
    fresh process), add `<field>/lora` ratios, write JSON lines (with the `machine()`) to --output and return (args,
    rounds)."""
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        sys.exit(0)
    if "lora" not in args.methods:
        parser.error("--methods must include lora: every ratio is relative to LoRA in the same run")
    forwarded = [f"--{name}={getattr(args, name)}" for name in passthrough if getattr(args, name) is not None]
    rounds: list[dict[str, dict]] = []
    for round_index in range(args.rounds):
        results = {}
        for method in args.methods:
            out = subprocess.run([sys.executable, script, "--worker", method, *forwarded],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"the {method} worker failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {round_index + 1}: {method:14s} step {results[method]['step_time_s']:.3f}s", flush=True)
        for result in results.values():
            for field in ratio_fields:
                result[f"{field}/lora"] = result[field] / results["lora"][field] if results["lora"][field] else None
        rounds.append(results)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    where = machine()
    with open(args.output, "w") as f:
        for round_index, results in enumerate(rounds):
            for result in results.values():
                f.write(json.dumps({"round": round_index + 1, **result, "config": vars(args), "machine": where}) + "\n")
    print(f"\nmedian over {args.rounds} interleaved rounds (ratios to LoRA in the same round):")
    return args, rounds


def print_ratio_table(args: argparse.Namespace, rounds: list[dict[str, dict]], first_header: str,
                      ratio_columns: list[tuple[str, str]]) -> None:
    """A Markdown table of the medians over rounds: per method, trainable count, step seconds, then each
    (header, field) of `ratio_columns` as the median of its per-round ratio to LoRA (`field/lora`)."""
    print(f"| {first_header} | trainable | step s | " + " | ".join(header for header, _ in ratio_columns) + " |")
    print("|---|---:|---:|" + "---:|" * len(ratio_columns))
    for method in args.methods:
        ratios = " | ".join(f"{median(rounds, method, f'{field}/lora'):.2f}" for _, field in ratio_columns)
        print(f"| {method} | {rounds[0][method]['trainable_params']:,} | "
              f"{median(rounds, method, 'step_time_s'):.3f} | {ratios} |")


def median(rounds: list[dict[str, dict]], method: str, key: str) -> float:
    """Median of one field of one method over the rounds (None values skipped)."""
    values = [results[method][key] for results in rounds if results[method][key] is not None]
    return statistics.median(values) if values else float("nan")
