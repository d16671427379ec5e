"""`hf-speft estimate`: per-GPU training memory from a model's config alone, SPEFT beside LoRA/PiSSA/full."""

from __future__ import annotations

import argparse
import json

from .common import CliError, check_local_or_hub, library_constant

ESTIMATE_PARTS = ("base_weight_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes",
                  "total_bytes")


def run(args: argparse.Namespace) -> None:
    check_local_or_hub(args.model, "model")
    from hf_speft.hub import human_bytes
    from hf_speft.memory import estimate_memory

    options = dict(target_modules=args.target_modules if args.target_modules != ["all-linear"] else "all-linear",
                   lora_r=args.lora_r, zero_stage=args.zero_stage, num_gpus=args.num_gpus,
                   load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit, seq_len=args.seq_len,
                   batch_size=args.batch_size, dtype=args.dtype,
                   gradient_checkpointing=not args.no_gradient_checkpointing)
    methods = [m for m in args.methods if not (m == "full" and (args.load_in_8bit or args.load_in_4bit))]
    try:
        estimates = [estimate_memory(args.model, method, **options) for method in methods]
    except OSError as error:  # transformers' "cannot find config.json" (missing on the Hub, offline, no access)
        raise CliError(f"Cannot read the config of {args.model!r}: {error}") from None
    if args.json:
        print(json.dumps([{**estimate.as_dict(), **options} for estimate in estimates], indent=2))
        return
    print(f"per-GPU memory of {args.model}: batch {args.batch_size} x {args.seq_len} tokens, {args.dtype}, "
          f"{args.num_gpus} GPU(s), ZeRO stage {args.zero_stage}"
          f"{', 8-bit base' if args.load_in_8bit else ', 4-bit base' if args.load_in_4bit else ''}"
          f"{'' if args.no_gradient_checkpointing else ', gradient checkpointing'}")
    print(f"{'method':10s} {'trainable':>13s} " + " ".join(f"{part[:-6]:>12s}" for part in ESTIMATE_PARTS))
    for estimate in estimates:
        parts = estimate.as_dict()
        print(f"{estimate.method:10s} {estimate.trainable_params:>13,} "
              + " ".join(f"{human_bytes(parts[part]):>12s}" for part in ESTIMATE_PARTS))


def add_parser(commands: argparse._SubParsersAction) -> None:
    estimate = commands.add_parser(
        "estimate", help="per-GPU training memory from a model's config alone, SPEFT beside LoRA/PiSSA/full",
        epilog="example: hf-speft estimate meta-llama/Meta-Llama-3-8B --load_in_8bit --seq_len 512 --batch_size 4")
    estimate.add_argument("model", help="causal LM Hub id or folder (only config.json is read)")
    estimate.add_argument("--methods", nargs="+", choices=library_constant("methods", "METHODS"),
                          default=["speft", "lora", "full"], help="methods to size")
    estimate.add_argument("--lora_r", type=int, default=8, help="LoRA/PiSSA rank and SPEFT's matched budget")
    estimate.add_argument("--target_modules", nargs="+", default=["all-linear"], help="module names to adapt")
    estimate.add_argument("--seq_len", type=int, default=512, help="tokens per sequence")
    estimate.add_argument("--batch_size", type=int, default=1, help="per GPU")
    estimate.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                          help="dtype of the base weights and activations")
    estimate.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=0, help="DeepSpeed ZeRO stage")
    estimate.add_argument("--num_gpus", type=int, default=1, help="GPUs that share ZeRO's partitions")
    quantized = estimate.add_mutually_exclusive_group()
    quantized.add_argument("--load_in_8bit", action="store_true", help="8-bit (bitsandbytes) base weights")
    quantized.add_argument("--load_in_4bit", action="store_true", help="4-bit (bitsandbytes) base weights")
    estimate.add_argument("--no_gradient_checkpointing", action="store_true", help="keep every activation")
    estimate.add_argument("--json", action="store_true", help="machine-readable output")
    estimate.set_defaults(run=run)
