"""`benchmarks/gpu_check.py --tiny`: the GPU check's code runs end to end on the CPU, so it is ready when a GPU is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hf_speft.ops import KERNELS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_runs_every_section(tmp_path):
    output = tmp_path / "gpu_check.json"
    env = {key: value for key, value in os.environ.items() if key != "HF_SPEFT_KERNEL"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # the automatic kernel choice's disk cache stays in the test's folder
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--output", str(output)], capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    sections = report["sections"]
    assert report["mode"] == "tiny" and list(sections) == ["tests", "kernel_dtypes", "kernels", "plan_8b"]
    assert all(section["ok"] and section["seconds"] > 0 for section in sections.values())
    tests = sections["tests"]  # the CPU half of tests/test_cuda.py ran in a sub-run and passed
    assert tests["passed"] >= 1 and tests["failures"] == tests["errors"] == 0
    assert f"| CUDA correctness tests | {tests['passed']} passed, 0 failed" in result.stdout
    assert sections["kernel_dtypes"]["fp32"]["sparse.mm"]["supported"]
    assert sections["kernel_dtypes"]["fp32"]["sampled_addmm"]["relative_error"] < 1e-5

    kernels = sections["kernels"]
    rows = kernels["rows"]
    assert [row["shape"] for row in rows] == [[64, 64], [16, 64], [224, 64], [64, 224]]
    strategies = [f"speft:{kernel}" for kernel in KERNELS]
    for row in rows:
        methods, errors = row["methods"], row["errors"]
        assert {"base", "lora", "shira", "supertuning", "speft:auto", "speft:csr", "speft:dense"} <= set(methods)
        assert all(name in methods or name in errors for name in strategies)  # every strategy timed or its error
        assert all(entry["s"] > 0 for entry in methods.values())
        assert row["nnz"] == 4 * sum(row["shape"])  # LoRA r=4's count, which every method trains
        assert all(entry["trainable"] == row["nnz"] for name, entry in methods.items() if name != "base")
        assert row["fastest_strategy"] in KERNELS and row["ratios_to_lora"]["lora"] == 1.0
        assert set(row["auto_choice"]) == {"forward", "input_grad", "values_grad"}  # one choice per product
        assert set(row["auto_choice"].values()) <= set(KERNELS) - {"auto"}
    assert set(report["kernel_choices"].values()) <= set(KERNELS) - {"auto"} and report["kernel_choices"]
    assert sum("SPEFT auto" in line for line in result.stdout.splitlines()) == len(rows)

    plan = sections["plan_8b"]
    assert plan["speft"]["trainable_params"] == plan["lora"]["trainable_params"] > 0
    assert plan["speft"]["salience_s"] > 0 and plan["speft"]["estimated_bytes"] > 0
    assert plan["speft_8bit"]["trainable_params"] == plan["speft"]["trainable_params"]  # bitsandbytes is installed
