"""`benchmarks/kernel_report.py`: every Triton kernel of the package compiles for sm_80 and sm_90 without a GPU, with
no register spills and 128-bit loads, and the cost model's report is valid JSON (a few seconds of compilation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_report  # noqa: E402 - from benchmarks/


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    output = tmp_path_factory.mktemp("kernel_report") / "kernel_report.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # this checkout's hf_speft
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--dtypes", "bf16",
                             "--output", str(output)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(output.read_text()), result.stdout


def test_every_kernel_compiles_for_both_targets_without_spills(report):
    data, _ = report
    compiled = {(row["kernel"], row["target"]) for row in data["kernels"]}
    assert compiled == {(kernel, target) for kernel in ("forward (_spmm_kernel)", "input_grad (_spmm_kernel)",
                                                        "values_grad (_sddmm_kernel)") for target in ("sm_80", "sm_90")}
    for row in data["kernels"]:
        assert row["spilled_bytes"] == 0 and row["stack_bytes"] == 0, row
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] < 48 * 1024, row
        assert row["widest_global_load_bits"] == 128, row  # vectorised loads of xᵀ / gᵀ rows
        assert row["BLOCK_T"] == 128 and row["BLOCK_E"] == 32  # what the strategy launches at 4,096 tokens


def test_products_and_cost_model_at_llama_3_8b_shapes(report):
    data, stdout = report
    shapes = data["shapes"]
    assert len(shapes) == 7 and shapes["gate_proj"] == [14336, 4096] and shapes["k_proj"] == [1024, 4096]
    assert sum(data["nnz"].values()) == 16 * sum(m + n for m, n in shapes.values())  # LoRA r=16's count
    tokens = data["tokens"]
    x_bytes = sum(tokens * n * 2 for _, n in shapes.values())
    products = {row["product"]: row for row in data["products"]}
    assert set(products) == {"forward", "prepare gᵀ", "input_grad", "values_grad"}
    for row in products.values():
        assert row["H200_ms"] == pytest.approx(row["H100_ms"] * 3.35 / 4.8)
    assert products["values_grad"]["read_bytes"] > 2 * x_bytes  # the xᵀ copy and the kernel read x twice at least
    paths = data["cost_model"]["paths"]
    ratios = {name: entry["ratio_to_lora"]["H200@790"] for name, entry in paths.items()}
    assert ratios["lora"] == 1.0
    assert ratios["fold"] < ratios["triton kernels, unfolded"] < ratios["dense strategy, unfolded"]
    assert "| fold |" in stdout and "| values_grad (_sddmm_kernel) | bf16 | sm_90 |" in stdout


def test_a_missing_cuobjdump_fails_clearly(monkeypatch, tmp_path):
    import triton

    monkeypatch.setattr(triton, "__file__", str(tmp_path / "triton" / "__init__.py"))
    with pytest.raises(FileNotFoundError, match=r"cuobjdump not found at .*ships with Triton's NVIDIA backend"):
        kernel_report.cuobjdump()
