"""Salience cost: time and peak memory of calibrating with every measure (scores and mask selection, as
`hf_speft.calibrate` runs them) against one training step, with the targets scored in one group or several
(`salience_groups`), and the memory of the global top-k (hf-speft's candidate buffer vs concatenating all scores, as
the reference code does).

Each run is a fresh subprocess on the tiny Llama of `memory_speed.py` (hidden 1024, 4 layers, vocab 8192, all 7
projection types, batch 4×256); JSON lines go to benchmarks/results/salience.jsonl.

    python benchmarks/salience.py
    python benchmarks/salience.py --measures gradient fisher --groups 1 4 --batches 2 --hidden 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import PeakRss, rss_bytes

from hf_speft.config import LAYER_COUPLED_MEASURES

MEASURES = ["magnitude", "random", "gradient", "snip", "taylor", "skeleton", "fisher", "grasp", "synflow", "force"]
TOPK = ["topk_hf_speft", "topk_concat"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
        target_modules=TARGETS, match_lora_rank=8, salience="magnitude"))
    ids = torch.randint(0, 8192, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


def _training_step(model, batch) -> tuple[float, int]:
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for _ in range(2):  # warm-up, then the measured step
        rss_before = rss_bytes()
        with PeakRss() as rss:
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
    model.eval()
    return seconds, rss.peak - rss_before


def measure_worker(run: str, args) -> dict:
    import hf_speft

    measure, groups = run.split("@")
    model, batch = _model_and_batch(args)
    step_s, step_rss = _training_step(model, batch)
    config = model.peft_config["default"]  # recalibrate the trained adapter with this run's settings
    config.salience, config.salience_groups, config.salience_batches = measure, int(groups), args.batches
    rss_before = rss_bytes()
    with PeakRss() as rss:
        start = time.perf_counter()
        hf_speft.calibrate(model, [batch], show_progress=False)
        seconds = time.perf_counter() - start
    return {"method": measure, "groups": int(groups), "salience_s": seconds,
            "salience_s_per_batch": seconds / args.batches,
            "step_s": step_s, "salience_per_batch/step": seconds / args.batches / step_s,
            "peak_extra_rss_bytes": rss.peak - rss_before, "step_peak_extra_rss_bytes": step_rss,
            "peak_rss/step": (rss.peak - rss_before) / max(step_rss, 1)}


def topk_worker(method: str, args) -> dict:
    import torch

    from hf_speft import select_mask

    generator = torch.Generator().manual_seed(0)
    shapes = [(args.topk_hidden, args.topk_hidden)] * 4 + [(2 * args.topk_hidden, args.topk_hidden)] * 3
    scores = {f"layer{i}.{j}": torch.rand(shape, generator=generator)
              for i in range(args.topk_layers) for j, shape in enumerate(shapes)}
    total = sum(value.numel() for value in scores.values())
    budget = round(args.topk_density * total)
    rss_before = rss_bytes()
    with PeakRss() as rss:
        start = time.perf_counter()
        if method == "topk_hf_speft":
            masks = select_mask(scores, budget, "global")
            selected = sum(mask.numel() for mask in masks.values())
        else:
            flat = torch.cat([value.reshape(-1) for value in scores.values()])
            selected = flat.topk(budget).indices.numel()
        seconds = time.perf_counter() - start
    return {"method": method, "scores": total, "budget": budget, "selected": selected, "seconds": seconds,
            "peak_extra_rss_bytes": rss.peak - rss_before, "scores_bytes": 4 * total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measures", nargs="+", default=MEASURES, choices=MEASURES)
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 4],
                        help="salience_groups to run (grasp and force: 1 only)")
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
    runs = [f"{measure}@{groups}" for measure in args.measures for groups in args.groups
            if groups == 1 or measure not in LAYER_COUPLED_MEASURES]
    results = []
    for method in runs + TOPK:
        out = subprocess.run([sys.executable, __file__, "--worker", method, *forwarded], capture_output=True,
                             text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{method}: done", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        for result in results:
            f.write(json.dumps({**result, "config": vars(args)}) + "\n")
    print("| measure | groups | s per batch | ÷ one training step | peak extra RSS MiB | ÷ one training step's |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results[: len(runs)]:
        print(f"| {r['method']} | {r['groups']} | {r['salience_s_per_batch']:.3f} | "
              f"{r['salience_per_batch/step']:.2f} | {r['peak_extra_rss_bytes'] / 2**20:.0f} | "
              f"{r['peak_rss/step']:.2f} |")
    print("\n| global top-k | scores | peak extra RSS MiB | ÷ score bytes | s |")
    print("|---|---:|---:|---:|---:|")
    for r in results[len(runs):]:
        print(f"| {r['method']} | {r['scores']:,} | {r['peak_extra_rss_bytes'] / 2**20:.1f} | "
              f"{r['peak_extra_rss_bytes'] / r['scores_bytes']:.2f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
