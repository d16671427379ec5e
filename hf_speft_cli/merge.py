"""`hf-speft merge`: base + adapter written as a merged model, one safetensors shard at a time."""

from __future__ import annotations

import argparse
import json
import os
import shutil

from .common import ADAPTER_DIR_HELP, CliError, check_local_or_hub, check_writable_output, speft_deltas, staged_folder


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


def run(args: argparse.Namespace) -> None:
    check_writable_output(args.out_dir, args.overwrite)
    check_local_or_hub(args.base, "base model")
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    _, deltas = speft_deltas(args.adapter_dir, "merge it in Python with PeftModel.from_pretrained(...)"
                                               ".merge_and_unload()")
    checkpoint = _base_checkpoint(args.base)
    shards = _shards(checkpoint)
    conv1d = _conv1d_modules(checkpoint)
    if os.path.abspath(args.out_dir) == os.path.abspath(checkpoint):
        raise CliError("OUT_DIR must differ from the base checkpoint folder (the base is never overwritten).")
    merged = set()
    with staged_folder(args.out_dir, replace=True) as staging:
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

    from hf_speft.ops import transposed_positions

    out_features, in_features = delta.shape
    indices, values = delta.all_entries()
    if not conv1d and tuple(weight.shape) == (out_features, in_features):
        positions = indices
    elif tuple(weight.shape) == (in_features, out_features):
        positions = transposed_positions(indices, out_features, in_features)
    else:
        raise CliError(f"Module {name!r}: the adapter was trained on a {delta.shape} weight, the base has "
                       f"{tuple(weight.shape)}.")
    result = weight.float().clone().reshape(-1)
    result[positions] += values
    if not torch.isfinite(result[positions]).all():
        raise CliError(f"Module {name!r}: the merged weight is not finite (the base holds huge values or NaN there).")
    return result.reshape(weight.shape).to(weight.dtype)


def add_parser(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge", help="write base + adapter as a merged model, shard by shard",
        epilog="example: hf-speft merge ./base out/adapter merged/ --dtype bf16  (peak memory: about one shard)")
    merge.add_argument("base", help="base model folder (safetensors) or Hub id")
    merge.add_argument("adapter_dir", help=ADAPTER_DIR_HELP)
    merge.add_argument("out_dir", help="folder for the merged model; a non-empty one is refused unless --overwrite")
    merge.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="dtype of the merged floating weights (default: keep the base's)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR as a whole")
    merge.set_defaults(run=run)
