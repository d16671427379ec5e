"""Salience cost: time and peak memory of calibrating with every measure (scores and mask selection, as
`hf_speft.calibrate` runs them) against one training step at the same batch, under the memory settings
(`salience_groups`, `salience_micro_batch_size`, `salience_dtype`), and the memory of the global top-k (hf-speft's
candidate buffer vs concatenating all scores, as the reference code does).

Each run is a fresh subprocess on the tiny Llama of `memory_speed.py` (hidden 1024, 4 layers, vocab 8192, all 7
projection types, batch 4×256). Peak memory is the kernel's (VmHWM, reset just before the measured work) above the
resident set before it, with glibc's mmap threshold fixed so freed tensors leave the RSS at once. A setting is
`g<groups>[-m<micro-batch rows>][-bf16]`. JSON lines go to benchmarks/results/salience.jsonl.

    python benchmarks/salience.py                                        # every measure, g1
    python benchmarks/salience.py --measures gradient fisher --settings g1 g1-m1 g2-m1 g1-m1-bf16 g4 \
        --output benchmarks/results/salience_memory.jsonl                # the memory settings
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from harness import LLAMA_PROJECTIONS, PeakGrowth

from hf_speft.measures import measure_info

MEASURES = ["magnitude", "random", "gradient", "snip", "taylor", "skeleton", "fisher", "grasp", "synflow", "force"]
TOPK = ["topk_hf_speft", "topk_concat"]


def _model_and_batch(args):
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_speft

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=args.seq_len)
    model = get_peft_model(LlamaForCausalLM(config), hf_speft.SparsePeftConfig(
        target_modules=LLAMA_PROJECTIONS, match_lora_rank=8, salience="magnitude"))
    ids = torch.randint(0, 8192, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


def parse_setting(setting: str) -> dict:
    """`g2-m1-bf16` -> {"groups": 2, "micro_batch_size": 1, "dtype": "bfloat16"}."""
    match = re.fullmatch(r"g(\d+)(?:-m(\d+))?(-bf16)?", setting)
    if not match:
        raise argparse.ArgumentTypeError(f"setting {setting!r}: use g<groups>[-m<micro-batch rows>][-bf16]")
    return {"groups": int(match[1]), "micro_batch_size": int(match[2]) if match[2] else None,
            "dtype": "bfloat16" if match[3] else "float32"}


def checked_setting(setting: str) -> str:
    parse_setting(setting)
    return setting


def _training_step(model, batch) -> tuple[float, int]:
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for _ in range(3):  # two warm-up steps (optimizer state, cached layouts), then the measured one
        with PeakGrowth() as peak:
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
    model.eval()
    return seconds, peak.extra


def measure_worker(run: str, args) -> dict:
    import hf_speft

    measure, setting = run.split("@")
    options = parse_setting(setting)
    model, batch = _model_and_batch(args)
    step_s, step_extra = _training_step(model, batch)
    config = model.peft_config["default"]  # recalibrate the trained adapter with this run's settings
    config.salience, config.salience_batches = measure, args.batches
    config.salience_groups, config.salience_micro_batch_size = options["groups"], options["micro_batch_size"]
    config.salience_dtype = options["dtype"]
    with PeakGrowth() as peak:
        start = time.perf_counter()
        hf_speft.calibrate(model, [batch], show_progress=False)
        seconds = time.perf_counter() - start
    return {"method": measure, "setting": setting, **options, "salience_s": seconds,
            "salience_s_per_batch": seconds / args.batches,
            "step_s": step_s, "salience_per_batch/step": seconds / args.batches / step_s,
            "peak_extra_rss_bytes": peak.extra, "step_peak_extra_rss_bytes": step_extra,
            "peak_rss/step": peak.extra / max(step_extra, 1)}


def topk_worker(method: str, args) -> dict:
    import torch

    from hf_speft import select_mask

    generator = torch.Generator().manual_seed(0)
    shapes = [(args.topk_hidden, args.topk_hidden)] * 4 + [(2 * args.topk_hidden, args.topk_hidden)] * 3
    scores = {f"layer{i}.{j}": torch.rand(shape, generator=generator)
              for i in range(args.topk_layers) for j, shape in enumerate(shapes)}
    total = sum(value.numel() for value in scores.values())
    budget = round(args.topk_density * total)
    with PeakGrowth() as peak:
        start = time.perf_counter()
        if method == "topk_hf_speft":
            masks = select_mask(scores, budget, "global")
            selected = sum(mask.numel() for mask in masks.values())
        else:
            flat = torch.cat([value.reshape(-1) for value in scores.values()])
            selected = flat.topk(budget).indices.numel()
        seconds = time.perf_counter() - start
    return {"method": method, "scores": total, "budget": budget, "selected": selected, "seconds": seconds,
            "peak_extra_rss_bytes": peak.extra, "scores_bytes": 4 * total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measures", nargs="+", default=MEASURES, choices=MEASURES)
    parser.add_argument("--settings", nargs="+", default=["g1"], type=checked_setting,
                        help="memory settings g<groups>[-m<micro-batch rows>][-bf16] (grasp and force: g1 only)")
    parser.add_argument("--no_topk", action="store_true", help="skip the global top-k comparison")
    parser.add_argument("--batches", type=int, default=4, help="salience batches per measure")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--topk_hidden", type=int, default=2048, help="top-k benchmark: layer width")
    parser.add_argument("--topk_layers", type=int, default=4, help="top-k benchmark: blocks of 7 matrices")
    parser.add_argument("--topk_density", type=float, default=0.005)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "salience.jsonl"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = topk_worker if args.worker in TOPK else measure_worker
        print(json.dumps(worker(args.worker, args)))
        return
    names = ("batches", "hidden", "layers", "batch", "seq_len", "topk_hidden", "topk_layers", "topk_density")
    forwarded = [f"--{name}={getattr(args, name)}" for name in names]
    runs = [f"{measure}@{setting}" for measure in args.measures for setting in args.settings
            if parse_setting(setting)["groups"] == 1 or not measure_info(measure).couples_layers]
    results = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for method in runs + ([] if args.no_topk else TOPK):
        out = subprocess.run([sys.executable, __file__, "--worker", method, *forwarded], capture_output=True,
                             text=True, check=True, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{method}: done", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        for result in results:
            f.write(json.dumps({**result, "config": vars(args)}) + "\n")
    print("| measure | setting | s per batch | ÷ one training step | peak extra RSS MiB | ÷ one training step's |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results[: len(runs)]:
        print(f"| {r['method']} | {r['setting']} | {r['salience_s_per_batch']:.3f} | "
              f"{r['salience_per_batch/step']:.2f} | {r['peak_extra_rss_bytes'] / 2**20:.0f} | "
              f"{r['peak_rss/step']:.2f} |")
    print("\n| global top-k | scores | peak extra RSS MiB | ÷ score bytes | s |")
    print("|---|---:|---:|---:|---:|")
    for r in results[len(runs):]:
        print(f"| {r['method']} | {r['scores']:,} | {r['peak_extra_rss_bytes'] / 2**20:.1f} | "
              f"{r['peak_extra_rss_bytes'] / r['scores_bytes']:.2f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
