"""`benchmarks/gpu_check.py --tiny`: the GPU check's code runs end to end on the CPU, so it is ready when a GPU is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_runs_every_section(tmp_path):
    output = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--output", str(output)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    sections = report["sections"]
    assert report["mode"] == "tiny" and all(section["ok"] for section in sections.values())
    assert sections["tests"]["passed"] >= 12 and "failed" not in sections["tests"]
    assert sections["kernel_dtypes"]["fp32"]["sparse.mm"]["supported"]
    assert sections["kernel_dtypes"]["fp32"]["sampled_addmm"]["relative_error"] < 1e-5
    rows = sections["kernels"]["rows"]
    assert [row["shape"] for row in rows] == [[64, 64], [16, 64], [224, 64], [64, 224]]
    assert all(row["base_s"] > 0 and row["lora_s"] > 0 and row["speft_s"] > 0 for row in rows)
    assert all(row["nnz"] == 4 * sum(row["shape"]) for row in rows)  # SPEFT at LoRA r=4's budget
    plan = sections["plan_8b"]
    assert plan["speft"]["trainable_params"] == plan["lora"]["trainable_params"] > 0
    assert plan["speft"]["salience_s"] > 0 and plan["speft"]["estimated_bytes"] > 0
    assert plan["speft_8bit"]["trainable_params"] == plan["speft"]["trainable_params"]  # bitsandbytes is installed
    assert "| CUDA correctness tests | 12 passed" in result.stdout
