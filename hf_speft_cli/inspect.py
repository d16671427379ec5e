"""`hf-speft inspect`: what a saved adapter holds."""

from __future__ import annotations

import argparse
import json

from .common import ADAPTER_DIR_HELP


def run(args: argparse.Namespace) -> None:
    from hf_speft.hub import human_bytes, summarize_adapter

    summary = summarize_adapter(args.adapter_dir)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
        return
    config = summary.config
    print(f"adapter:        {summary.path}")
    print(f"base model:     {config.get('base_model_name_or_path')}")
    print(f"salience:       {config.get('salience')}   scope: {config.get('mask_scope')}   "
          f"updates: {config.get('mask_update', 'static')}")
    print(f"trainable:      {summary.nnz:,} of {summary.targeted:,} targeted weights "
          f"(density {summary.density:.6f}, LoRA-equivalent rank {summary.matched_lora_rank:.2f})")
    print(f"dtypes:         {', '.join(f'{k}={v}' for k, v in sorted(summary.dtypes.items()))}")
    print(f"file:           {human_bytes(summary.file_bytes)} (dense delta {human_bytes(summary.dense_delta_bytes)}, "
          f"LoRA of the same count {human_bytes(summary.lora_bytes)})")
    print("\nmodule                                             shape          trainable    density")
    for module in summary.modules:
        shape = f"{module.shape[0]}x{module.shape[1]}"
        print(f"{module.name:50s} {shape:14s} {module.nnz:>9,}    {module.density:.6f}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser("inspect", help="what a saved adapter holds", epilog="example: hf-speft inspect "
                                  "out/adapter --json")
    inspect.add_argument("adapter_dir", help=ADAPTER_DIR_HELP)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=run)
