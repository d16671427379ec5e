"""`hf-speft`: inspect, merge, calibrate and plot SPEFT adapters from the shell.

Every command reports bad input as one line on stderr with exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, Optional

from .data import read_jsonl
from .hub import AdapterFolderError, human_bytes, read_adapter_folder, summarize_adapter
from .memory import METHODS as MEMORY_METHODS

logger = logging.getLogger(__name__)


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------- inspect
def inspect_command(args: argparse.Namespace) -> None:
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


# ----------------------------------------------------------------------------------------------------------- merge
def _base_checkpoint(base: str) -> str:
    if os.path.isdir(base):
        return base
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as error:  # noqa: BLE001 - any download failure is a user-facing "cannot get the base"
        raise CliError(f"Cannot find the base model {base!r} locally or on the Hub: {error}") from None


def _shards(checkpoint: str) -> list[str]:
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
        return ["model.safetensors"]
    raise CliError(f"{checkpoint!r} holds no safetensors checkpoint (model.safetensors or an index); merge streams "
                   "safetensors shards. For other formats merge in Python: PeftModel.from_pretrained(...)"
                   ".merge_and_unload().")


def _adapter_deltas(adapter_dir: str) -> dict[str, Any]:
    """module name -> validated `checkpoint.ModuleDelta` of a folder whose tensors are all SPEFT tensors."""
    folder = read_adapter_folder(adapter_dir)
    other = sorted(key for key in folder.tensors if ".speft_" not in key)
    if other:
        raise CliError(f"The adapter also holds non-SPEFT tensors ({other[:3]}, e.g. modules_to_save); merge it in "
                       "Python with PeftModel.from_pretrained(...).merge_and_unload().")
    return folder.deltas


@contextlib.contextmanager
def _staged_folder(out_dir: str) -> Iterator[str]:
    """A temporary folder beside `out_dir` to write into; its files move into `out_dir` only if the block succeeds,
    so a failed command leaves `out_dir` as it was (absent, or with its old files)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", dir=parent)
    try:
        yield staging
        if not os.path.exists(out_dir):
            os.replace(staging, out_dir)
            return
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def merge_command(args: argparse.Namespace) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    deltas = _adapter_deltas(args.adapter_dir)
    checkpoint = _base_checkpoint(args.base)
    shards = _shards(checkpoint)
    conv1d = _conv1d_modules(checkpoint)
    if os.path.abspath(args.out_dir) == os.path.abspath(checkpoint):
        raise CliError("OUT_DIR must differ from the base checkpoint folder (the base is never overwritten).")
    merged = set()
    with _staged_folder(args.out_dir) as staging:
        for shard in tqdm(shards, desc="merging shards"):
            out = {}
            with safe_open(os.path.join(checkpoint, shard), framework="pt") as f:
                metadata = f.metadata() or {}
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    module = key.removesuffix(".weight")
                    if key.endswith(".weight") and module in deltas:
                        tensor = _with_delta(tensor, deltas[module], name=module, conv1d=module in conv1d)
                        merged.add(module)
                    out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            save_file(out, os.path.join(staging, shard), metadata={**metadata, "format": "pt"})
            del out
        missing = sorted(set(deltas) - merged)
        if missing:
            raise CliError(f"The base checkpoint has no weights for adapter modules {missing[:5]}; is it the base "
                           "model the adapter was trained on?")
        for name in os.listdir(checkpoint):
            source = os.path.join(checkpoint, name)
            if os.path.isfile(source) and not name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                shutil.copy(source, os.path.join(staging, name))
        if dtype is not None and os.path.isfile(os.path.join(staging, "config.json")):
            path = os.path.join(staging, "config.json")
            with open(path) as f:
                config = json.load(f)
            config["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
    print(f"merged {len(merged)} modules into {len(shards)} shard(s) in {args.out_dir}")


def _conv1d_modules(checkpoint: str) -> set[str]:
    """Names of transformers `Conv1D` modules (weights stored (in, out), e.g. GPT-2) in the checkpoint's architecture,
    found on an empty (meta-device) model built from its config."""
    import transformers
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint)
        model_class = getattr(transformers, (config.architectures or [""])[0])
        with init_empty_weights():
            model = model_class(config)
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
    return {name for name, module in model.named_modules() if isinstance(module, Conv1D)}


def _with_delta(weight, delta, name: str, conv1d: bool):
    """weight + the sparse delta (a `checkpoint.ModuleDelta`), computed in fp32; (in, out) weights (GPT-2 Conv1D)
    are handled. A non-finite result is refused."""
    import torch

    out_features, in_features = delta.shape
    indices, values = delta.all_entries()
    if not conv1d and tuple(weight.shape) == (out_features, in_features):
        positions = indices
    elif tuple(weight.shape) == (in_features, out_features):
        rows, cols = indices // in_features, indices % in_features
        positions = cols * out_features + rows
    else:
        raise CliError(f"Module {name!r}: the adapter was trained on a {delta.shape} weight, the base has "
                       f"{tuple(weight.shape)}.")
    result = weight.float().clone().reshape(-1)
    result[positions] += values
    if not torch.isfinite(result[positions]).all():
        raise CliError(f"Module {name!r}: the merged weight is not finite (the base holds huge values or NaN there).")
    return result.reshape(weight.shape).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------- salience
def _texts(data: str) -> list[str]:
    """Training texts from a .jsonl file (text, prompt+completion, question+answer), a .txt file, or a dataset."""
    if os.path.isfile(data):
        if data.endswith(".jsonl"):
            return [_row_text(row, f"{data}, line {number}") for number, row in read_jsonl(data)]
        with open(data) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    if os.path.sep in data and not os.path.exists(data):
        raise CliError(f"Data file {data!r} does not exist.")
    from datasets import load_dataset

    try:
        rows = load_dataset(data, split="train")
    except Exception as error:  # noqa: BLE001 - surfaced as one line
        raise CliError(f"Cannot load the dataset {data!r}: {error}") from None
    return [_row_text(row, data) for row in rows]


def _row_text(row: dict, where: str) -> str:
    for fields in (("text",), ("prompt", "completion"), ("question", "answer")):
        if all(field in row for field in fields):
            return "".join(str(row[field]) if i == 0 else " " + str(row[field]) for i, field in enumerate(fields))
    raise CliError(f"{where}: expected a 'text', 'prompt'+'completion' or 'question'+'answer' field; got {sorted(row)}.")


def salience_command(args: argparse.Namespace) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import SparsePeftConfig, calibrate
    from .salience import get_measure

    budget = {name: getattr(args, name) for name in ("density", "num_params", "match_lora_rank")
              if getattr(args, name) is not None}
    targets = args.target_modules if args.target_modules != ["all-linear"] else "all-linear"
    config = SparsePeftConfig(target_modules=targets, salience=args.measure, salience_batches=args.batches,
                              mask_scope=args.scope, salience_micro_batch_size=args.micro_batch_size, **budget)
    texts = _texts(args.data)
    if not texts:
        raise CliError(f"{args.data!r} holds no text.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    except OSError as error:
        raise CliError(f"Cannot load the model {args.model!r}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), args.batch_size):
        encoded = tokenizer(texts[start:start + args.batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=args.max_length)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        batches.append({**encoded, "labels": labels})
    peft_model = get_peft_model(model, config)
    if not get_measure(args.measure).data_free:  # data-free masks are built inside get_peft_model
        calibrate(peft_model, batches)
    peft_model.save_pretrained(args.out)
    summary = summarize_adapter(args.out)
    print(f"saved a {args.measure}-salience mask of {summary.nnz:,} weights (density {summary.density:.6f}) to "
          f"{args.out}; train it with PeftModel.from_pretrained(base, {args.out!r}, is_trainable=True)")


# ----------------------------------------------------------------------------------------------------------- plot
def plot_command(args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("plot needs matplotlib: pip install 'hf-speft[plot]'.") from None
    import numpy as np

    folder = read_adapter_folder(args.adapter_dir)
    summary = summarize_adapter(args.adapter_dir, folder)
    layers: dict[int, dict[str, float]] = {}
    kinds: list[str] = []
    for module in summary.modules:
        match = re.search(r"\.(\d+)\.", f".{module.name}.")
        layer = int(match.group(1)) if match else -1
        kind = module.name.rsplit(".", 1)[-1]
        layers.setdefault(layer, {})[kind] = module.density
        if kind not in kinds:
            kinds.append(kind)
    order = sorted(layers)
    grid = np.full((len(order), len(kinds)), np.nan)
    for row, layer in enumerate(order):
        for column, kind in enumerate(kinds):
            grid[row, column] = layers[layer].get(kind, np.nan)
    values = np.concatenate([t.float().abs().numpy() for k, t in folder.tensors.items() if k.endswith(".speft_values")])

    figure, (heat, hist) = plt.subplots(1, 2, figsize=(12, max(3, 0.35 * len(order) + 2)))
    image = heat.imshow(grid, aspect="auto", cmap="viridis")
    heat.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    heat.set_yticks(range(len(order)), [str(layer) if layer >= 0 else "-" for layer in order])
    heat.set_xlabel("module")
    heat.set_ylabel("layer")
    heat.set_title(f"mask density ({summary.config.get('salience')}, {summary.config.get('mask_scope')})")
    figure.colorbar(image, ax=heat)
    hist.hist(values, bins=50, log=True)
    hist.set_xlabel("|value|")
    hist.set_ylabel("entries")
    hist.set_title(f"trained values ({summary.nnz:,} entries)")
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------------------------------------- main
EXAMPLES = """examples:
  hf-speft inspect out/adapter
  hf-speft inspect out/adapter --json
  hf-speft merge meta-llama/Meta-Llama-3-8B out/adapter merged/ --dtype bf16
  hf-speft salience ./my-base data/train.jsonl --measure gradient --density 0.005 --out out/mask
  hf-speft plot out/adapter --out mask.png
  hf-speft estimate meta-llama/Meta-Llama-3-8B --load_in_8bit --seq_len 1024 --batch_size 4
"""


# -------------------------------------------------------------------------------------------------------- estimate
ESTIMATE_PARTS = ("base_weight_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes",
                  "total_bytes")


def estimate_command(args: argparse.Namespace) -> None:
    from .memory import estimate_memory

    options = dict(target_modules=args.target_modules if args.target_modules != ["all-linear"] else "all-linear",
                   lora_r=args.lora_r, zero_stage=args.zero_stage, num_gpus=args.num_gpus,
                   load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit, seq_len=args.seq_len,
                   batch_size=args.batch_size, dtype=args.dtype,
                   gradient_checkpointing=not args.no_gradient_checkpointing)
    methods = [m for m in args.methods if not (m == "full" and (args.load_in_8bit or args.load_in_4bit))]
    estimates = [estimate_memory(args.model, method, **options) for method in methods]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-speft", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="what a saved adapter holds", epilog="example: hf-speft inspect "
                                  "out/adapter --json")
    inspect.add_argument("adapter_dir")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=inspect_command)

    merge = commands.add_parser(
        "merge", help="write base + adapter as a merged model, shard by shard",
        epilog="example: hf-speft merge ./base out/adapter merged/ --dtype bf16  (peak memory: about one shard)")
    merge.add_argument("base", help="base model folder (safetensors) or Hub id")
    merge.add_argument("adapter_dir")
    merge.add_argument("out_dir")
    merge.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="dtype of the merged floating weights (default: keep the base's)")
    merge.set_defaults(run=merge_command)

    salience = commands.add_parser(
        "salience", help="calibrate a mask on data and save a ready-to-train adapter",
        epilog="example: hf-speft salience ./base data.jsonl --measure gradient --density 0.005 --out out/mask")
    salience.add_argument("model", help="causal LM folder or Hub id (with its tokenizer)")
    salience.add_argument("data", help=".jsonl (text | prompt+completion | question+answer), .txt, or dataset name")
    salience.add_argument("--measure", default="gradient")
    budget = salience.add_mutually_exclusive_group(required=True)
    budget.add_argument("--density", type=float)
    budget.add_argument("--num_params", type=int)
    budget.add_argument("--match_lora_rank", type=int)
    salience.add_argument("--target_modules", nargs="+", default=["all-linear"])
    salience.add_argument("--scope", choices=["global", "local"], default="global")
    salience.add_argument("--batches", type=int, default=64, help="salience batches (default 64)")
    salience.add_argument("--batch_size", type=int, default=16)
    salience.add_argument("--micro_batch_size", type=int, help="back-propagate each batch in micro-batches of this "
                          "many rows (less memory, the same mask)")
    salience.add_argument("--max_length", type=int, default=512)
    salience.add_argument("--out", required=True, help="folder for the adapter")
    salience.set_defaults(run=salience_command)

    plot = commands.add_parser("plot", help="per-layer x per-module density heatmap and |values| histogram",
                               epilog="example: hf-speft plot out/adapter --out mask.png")
    plot.add_argument("adapter_dir")
    plot.add_argument("--out", default="mask.png")
    plot.set_defaults(run=plot_command)

    estimate = commands.add_parser(
        "estimate", help="per-GPU training memory from a model's config alone, SPEFT beside LoRA/PiSSA/full",
        epilog="example: hf-speft estimate meta-llama/Meta-Llama-3-8B --load_in_8bit --seq_len 512 --batch_size 4")
    estimate.add_argument("model", help="causal LM Hub id or folder (only config.json is read)")
    estimate.add_argument("--methods", nargs="+", choices=list(MEMORY_METHODS),
                          default=["speft", "lora", "full"])
    estimate.add_argument("--lora_r", type=int, default=8, help="LoRA/PiSSA rank and SPEFT's matched budget")
    estimate.add_argument("--target_modules", nargs="+", default=["all-linear"])
    estimate.add_argument("--seq_len", type=int, default=512)
    estimate.add_argument("--batch_size", type=int, default=1, help="per GPU")
    estimate.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    estimate.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=0)
    estimate.add_argument("--num_gpus", type=int, default=1)
    quantized = estimate.add_mutually_exclusive_group()
    quantized.add_argument("--load_in_8bit", action="store_true")
    quantized.add_argument("--load_in_4bit", action="store_true")
    estimate.add_argument("--no_gradient_checkpointing", action="store_true")
    estimate.add_argument("--json", action="store_true", help="machine-readable output")
    estimate.set_defaults(run=estimate_command)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.run(args)
    except (CliError, AdapterFolderError, ValueError, FileNotFoundError) as error:
        print(f"hf-speft {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `hf-speft inspect DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
