"""A GPU-free report on the Triton kernels and a cost model of a training step at Llama-3-8B shapes.

    python benchmarks/kernel_report.py                   # writes benchmarks/results/kernel_report.json
    python benchmarks/kernel_report.py --dtypes bf16 --output /tmp/report.json   # what the test runs

1. `kernels`: every Triton kernel launch of `hf_speft.kernels.triton` (the forward correction, the input gradient
   and the values' gradient) is compiled for sm_80 and sm_90 with the arguments, constexprs and specialisation the
   strategy itself launches with at 4,096 tokens (`triton.compile(ASTSource(...), target=GPUTarget(...))`, no GPU
   needed); `cuobjdump -res-usage` (shipped with Triton's NVIDIA backend) reads registers per thread, spilled
   (local) bytes and shared memory; the PTX gives the widest global load.
2. `products`: the bytes each product of the `triton` strategy reads and writes for the 7 linear targets of one
   Llama-3-8B decoder layer (4,096 tokens, bf16, the r=16 budget split by the package's own budget code), and the
   time that implies at H100 (3.35 TB/s) and H200 (4.8 TB/s) memory bandwidth.
3. `paths`: a cost model of the layer's linear work per training step for each way the delta reaches the product
   (fold, transient merge on a quantized base, the unfolded `triton` kernels, the unfolded `dense` strategy) and for
   LoRA r=16: base GEMM FLOPs at 790 TFLOP/s (what a bf16 GEMM reaches) or 989 (the data-sheet peak) plus bytes at
   the memory bandwidth, added without overlap; the ratio to LoRA is the prediction docs/kernels.md states. Everything
   but these linear layers (attention, norms, the loss) is the same for both methods and left out, so a whole step's
   ratio is closer to 1 than these.
It is a prediction until benchmarks/gpu_check.py has run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LLAMA3_8B = ROOT / "recipes" / "configs" / "models" / "llama3_8b" / "config.json"
TARGETS = {"sm_80": 80, "sm_90": 90}
DTYPES = ("bf16", "fp16", "fp32")
TOKENS, RANK = 4096, 16
GPUS = {"H100": 3.35e12, "H200": 4.8e12}  # memory bandwidth, bytes/s
GEMM_RATES = {"790": 790e12, "989": 989e12}  # bf16 dense GEMM, FLOP/s
SECTOR = 32  # bytes a scattered access moves (one DRAM sector)
ACTIVATION, VALUE, INDEX = 2, 4, 4  # bytes: bf16 activations and weights, float32 values, int32 indices


def cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(f"cuobjdump not found at {path}: it ships with Triton's NVIDIA backend "
                                "(`pip install triton` on Linux x86-64); the kernel report needs it.")
    return path


def layer_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of the 7 linear targets of a Llama-3-8B decoder layer, from the recipe's model config."""
    config = json.loads(LLAMA3_8B.read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def layer_budget(shapes: dict[str, tuple[int, int]], rank: int = RANK) -> dict[str, int]:
    """Entries per target at LoRA r=`rank`'s trainable count, split as the package splits a budget (local scope)."""
    from hf_speft import SparsePeftConfig
    from hf_speft.masking import local_budgets

    total = SparsePeftConfig(match_lora_rank=rank).total_budget(list(shapes.values()))
    return local_budgets({name: m * n for name, (m, n) in shapes.items()}, total)


# ---------------------------------------------------------------------------------------------------- compilation

def launches(dtype_name: str, tokens: int = TOKENS, shape: tuple[int, int] = (4096, 4096), nnz: int = 131_072):
    """{name: (kernel, arguments, constexprs)} of every launch of the `triton` strategy, built by the strategy's own
    launch functions on meta tensors (no memory, data pointer 0: 16-byte aligned like CUDA allocations)."""
    import torch

    from hf_speft.kernels import triton as kernels

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    out_features, in_features = shape

    def empty(*size, kind=dtype):
        return torch.empty(*size, dtype=kind, device="meta")

    values, col, order = empty(nnz, kind=torch.float32), empty(nnz, kind=torch.int32), empty(nnz, kind=torch.int32)
    x_t, grad_t = empty(in_features, tokens), empty(out_features, tokens)
    forward = kernels.spmm_launch(empty(tokens, out_features), x_t, values, empty(out_features + 1, kind=torch.int32),
                                  col, None, base=empty(tokens, out_features))
    input_grad = kernels.spmm_launch(empty(tokens, in_features), grad_t, values,
                                     empty(in_features + 1, kind=torch.int32), col, order)
    partial = empty(kernels.token_chunks(tokens)[0], nnz, kind=torch.float32)
    values_grad = kernels.sddmm_launch(partial, grad_t, x_t, empty(out_features + 1, kind=torch.int32), col)
    return {"forward (_spmm_kernel)": (kernels._spmm_kernel, *forward[1:]),
            "input_grad (_spmm_kernel)": (kernels._spmm_kernel, *input_grad[1:]),
            "values_grad (_sddmm_kernel)": (kernels._sddmm_kernel, *values_grad[1:])}


def compile_kernel(kernel, arguments: tuple, constexprs: dict, capability: int) -> dict:
    """Compile one launch for `sm_<capability>` as the launcher would specialise it; its resource usage."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    bound = dict(zip(kernel.arg_names, arguments)) | constexprs
    signature, constants, attrs = {}, {}, {}
    for position, name in enumerate(kernel.arg_names):
        value = bound[name]
        if name in constexprs:
            signature[name], constants[(position,)] = "constexpr", value
            continue
        kind, specialisation = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constants[(position,)] = value
        elif specialisation:
            attrs[(position,)] = BaseBackend.parse_attr(specialisation)
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                              target=GPUTarget("cuda", capability, 32))
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump()), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[1]))
    widths = [int(bits) * int(count or 1) for count, bits in
              re.findall(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.b(\d+)", compiled.asm["ptx"])]
    return {"registers": int(fields["REG"]), "spilled_bytes": int(fields["LOCAL"]), "stack_bytes": int(fields["STACK"]),
            "shared_bytes": int(fields["SHARED"]) + compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "widest_global_load_bits": max(widths, default=0)}


def kernel_section(dtypes: tuple[str, ...]) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for name, (kernel, arguments, constexprs) in launches(dtype).items():
            blocks = {key: value for key, value in constexprs.items() if key.startswith("BLOCK")}
            for target, capability in TARGETS.items():
                start = time.perf_counter()
                usage = compile_kernel(kernel, arguments, constexprs, capability)
                rows.append({"kernel": name, "dtype": dtype, "target": target, **blocks, **usage,
                             "compile_s": round(time.perf_counter() - start, 2)})
    return rows


# ------------------------------------------------------------------------------------------------------ cost model

def triton_bytes(m: int, n: int, nnz: int, tokens: int = TOKENS) -> dict[str, tuple[int, int]]:
    """(read, written) bytes of each product of the `triton` strategy for one (m, n) target with `nnz` entries.

    Each transposed copy reads and writes its operand once; a kernel reads every row of xᵀ/gᵀ it needs once from
    memory (the programs in flight share one token block or chunk of it, which stays in L2) and its CSR arrays
    once. The values' gradient writes and re-reads its chunks' float32 partial sums; the input gradient's sum with
    the base's (done by autograd) is counted with it."""
    from hf_speft.kernels.triton import token_chunks

    x, g = tokens * n * ACTIVATION, tokens * m * ACTIVATION
    entries, partials = nnz * (INDEX + VALUE), token_chunks(tokens)[0] * nnz * VALUE
    return {
        "forward": (x + x + entries + (m + 1) * INDEX + g, x + g),  # xᵀ copy; kernel reads xᵀ, CSR, base; writes y
        "prepare gᵀ": (g, g),
        "input_grad": (g + entries + nnz * INDEX + (n + 1) * INDEX + 2 * x, x + x),  # + the sum with the base's
        "values_grad": (x + x + g + nnz * INDEX + (m + 1) * INDEX + partials, x + partials + nnz * VALUE),
    }


def _scatter_bytes(nnz: int) -> int:
    """Writing `nnz` scattered weight entries (fold, restore, merge): a sector read and written per entry, plus
    the indices, values and saved originals read contiguously."""
    return nnz * (2 * SECTOR + INDEX + VALUE + ACTIVATION)


def path_costs(m: int, n: int, nnz: int, tokens: int = TOKENS, rank: int = RANK) -> dict[str, tuple[float, int]]:
    """(extra FLOPs, extra bytes) per training step of one target over its frozen base's forward and input-gradient
    GEMMs (which every method pays), for each path and LoRA."""
    x, g = tokens * n * ACTIVATION, tokens * m * ACTIVATION
    sparse = {name: sum(pair) for name, pair in triton_bytes(m, n, nnz, tokens).items()}
    sddmm = 2 * tokens * nnz, sparse["prepare gᵀ"] + sparse["values_grad"]
    dense_delta = m * n * ACTIVATION + _scatter_bytes(nnz)  # a zeroed dense Δ and the scatter into it
    return {
        # peft LoRA: x·A, ·B, the scaling and the sum (forward); the four products and x's gradient sum (backward)
        "lora": (6 * tokens * rank * (m + n), (x + 6 * g) + (4 * g + 5 * x)),
        # W0+Δ written before the forward GEMM and before the input-gradient GEMM, W0 restored after each
        "fold": (sddmm[0], 4 * _scatter_bytes(nnz) + sddmm[1]),
        # a quantized base dequantized to bf16 and merged once per pass (forward, backward), freed after; LoRA's
        # base product on the same quantized weight is taken to cost one bf16 GEMM and no dequantisation
        "transient merge, 8-bit": (sddmm[0], 2 * (m * n * (1 + ACTIVATION) + _scatter_bytes(nnz)) + sddmm[1]),
        "transient merge, 4-bit": (sddmm[0], 2 * (m * n * (0.5 + ACTIVATION) + _scatter_bytes(nnz)) + sddmm[1]),
        "triton kernels, unfolded": (2 * tokens * nnz * 3, sum(sparse.values())),
        "dense strategy, unfolded": (3 * 2 * tokens * m * n, 2 * dense_delta + 2 * (x + g) + 3 * g + 2 * x
                                     + 2 * m * n * 4),  # Δ twice; GEMM operands; gᵀx blocks gathered
    }


def cost_model(shapes: dict[str, tuple[int, int]], budget: dict[str, int], tokens: int = TOKENS,
               rank: int = RANK) -> dict:
    """Per path: the layer's predicted time of the linear work per step at each GPU and GEMM rate, and its ratio
    to LoRA's."""
    base_flops = sum(2 * 2 * tokens * m * n for m, n in shapes.values())  # forward + input gradient GEMMs
    paths: dict[str, dict] = {}
    for name in path_costs(1, 1, 1):
        flops = sum(path_costs(*shapes[t], budget[t], tokens, rank)[name][0] for t in shapes)
        moved = sum(path_costs(*shapes[t], budget[t], tokens, rank)[name][1] for t in shapes)
        paths[name] = {"extra_flops": flops, "extra_bytes": int(moved), "ms": {
            f"{gpu}@{rate}": 1e3 * ((base_flops + flops) / GEMM_RATES[rate] + moved / GPUS[gpu])
            for gpu in GPUS for rate in GEMM_RATES}}
    for entry in paths.values():
        entry["ratio_to_lora"] = {key: value / paths["lora"]["ms"][key] for key, value in entry["ms"].items()}
    return {"base_gemm_flops": base_flops, "paths": paths}


def predicted_ratios(shape: tuple[int, int], nnz: int, tokens: int = TOKENS, rank: int = RANK, gpu: str = "H200",
                     rate: str = "790") -> dict[str, float]:
    """Each path's predicted time ÷ LoRA's for one (out, in) target: what benchmarks/gpu_check.py prints beside
    what it measures."""
    model = cost_model({"target": shape}, {"target": nnz}, tokens, rank)
    return {name: entry["ratio_to_lora"][f"{gpu}@{rate}"] for name, entry in model["paths"].items()}


def product_section(shapes: dict[str, tuple[int, int]], budget: dict[str, int]) -> list[dict]:
    rows = []
    for product in triton_bytes(1, 1, 1):
        read = sum(triton_bytes(*shapes[t], budget[t])[product][0] for t in shapes)
        written = sum(triton_bytes(*shapes[t], budget[t])[product][1] for t in shapes)
        rows.append({"product": product, "read_bytes": read, "written_bytes": written,
                     **{f"{gpu}_ms": 1e3 * (read + written) / bandwidth for gpu, bandwidth in GPUS.items()}})
    return rows


def report(dtypes: tuple[str, ...] = DTYPES) -> dict:
    import torch
    import triton

    cuobjdump()  # before any work: a clear error if it is missing
    shapes = layer_shapes()
    budget = layer_budget(shapes)
    return {"triton": triton.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "tokens": TOKENS, "lora_rank": RANK, "shapes": {k: list(v) for k, v in shapes.items()}, "nnz": budget,
            "bandwidth_bytes_per_s": GPUS, "gemm_flops_per_s": GEMM_RATES,
            "kernels": kernel_section(dtypes), "products": product_section(shapes, budget),
            "cost_model": cost_model(shapes, budget)}


def table(data: dict) -> str:
    """The Markdown tables benchmarks/README.md shows (through benchmarks/tables.py)."""
    lines = [f"Compiled with Triton {data['triton']} for sm_80/sm_90 at {data['tokens']:,} tokens ({data['date']}).",
             "", "| kernel | dtype | target | BLOCK sizes | registers | spilled bytes | shared bytes | widest load |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for row in data["kernels"]:
        blocks = " ".join(f"{key.removeprefix('BLOCK_')}={value}" for key, value in row.items()
                          if key.startswith("BLOCK"))
        lines.append(f"| {row['kernel']} | {row['dtype']} | {row['target']} | {blocks} | {row['registers']} | "
                     f"{row['spilled_bytes']} | {row['shared_bytes']} | {row['widest_global_load_bits']} bits |")
    lines += ["", "| `triton` product, one Llama-3-8B layer (7 targets) | read MB | written MB | H100 ms | H200 ms |",
              "|---|---:|---:|---:|---:|"]
    for row in data["products"]:
        lines.append(f"| {row['product']} | {row['read_bytes'] / 1e6:,.0f} | {row['written_bytes'] / 1e6:,.0f} | "
                     f"{row['H100_ms']:.3f} | {row['H200_ms']:.3f} |")
    return "\n".join(lines + ["", prediction_table(data)])


def prediction_table(data: dict) -> str:
    """The predicted linear-layer time per step of each path and its ratio to LoRA (docs/kernels.md)."""
    keys = list(data["cost_model"]["paths"]["lora"]["ms"])
    lines = ["| path (predicted, linear layers of one decoder layer) | extra GB moved | "
             + " | ".join(f"ms, {key} TFLOP/s" for key in keys) + " | ÷ LoRA |",
             "|---|---:|" + "---:|" * len(keys) + "---|"]
    for name, entry in data["cost_model"]["paths"].items():
        ratios = sorted(entry["ratio_to_lora"].values())
        spread = f"{ratios[0]:.2f}×" if ratios[-1] - ratios[0] < 0.005 else f"{ratios[0]:.2f}–{ratios[-1]:.2f}×"
        lines.append(f"| {name} | {entry['extra_bytes'] / 1e9:.2f} | "
                     + " | ".join(f"{entry['ms'][key]:.2f}" for key in keys) + f" | {spread} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--output", type=Path, default=RESULTS / "kernel_report.json")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels even where the tests interpret them
    data = report(tuple(args.dtypes))
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    spills = [f"{row['kernel']} {row['dtype']} {row['target']}" for row in data["kernels"] if row["spilled_bytes"]]
    if spills:
        print(f"register spills in: {', '.join(spills)}", file=sys.stderr)
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
