"""benchmarks/quality.py end to end on a tiny encoder: one seed, 30 steps, the JSON schema, table and chart."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import glue
import pytest
from encoder_helpers import build_tiny_encoder, write_sst2

HARNESS = Path(__file__).parents[1] / "benchmarks" / "quality.py"
spec = importlib.util.spec_from_file_location("quality_benchmark", HARNESS)
quality = sys.modules["quality_benchmark"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


@pytest.mark.slow
def test_quality_harness_end_to_end(tmp_path, capsys):
    model, data = build_tiny_encoder(tmp_path / "model"), write_sst2(tmp_path / "sst2", size=64)
    output = tmp_path / "quality.json"
    args = ["--model_name_or_path", str(model), "--data_dir", str(data), "--test_file", str(data / "dev.tsv"),
            "--methods", "lora", "speft-gradient", "--seeds", "0", "--max_steps", "30", "--batch_size", "8",
            "--max_train_samples", "48", "--salience_batches", "2", "--output", str(output)]
    quality.main(args)
    report = json.loads(output.read_text())
    assert report["benchmark"] == "quality_sst2" and report["config"]["max_train_samples"] == 48
    assert [(run["method"], run["seed"]) for run in report["runs"]] == [("lora", 0), ("speft-gradient", 0)]
    for run in report["runs"]:
        assert run["num_train"] == 48 and run["num_eval"] == 64 and 0 <= run["accuracy"] <= 1
        assert run["learning_rate"] == quality.learning_rate(run["method"]) and run["peak_memory_bytes"] > 0
        assert run["test_accuracy"] == run["accuracy"]  # the test file is the dev split here
        assert (run["salience_seconds"] > 0) == run["method"].startswith("speft")  # calibration time, SPEFT only
        assert run["salience_seconds"] < run["train_time_s"]
    lora, speft = report["summary"]
    assert lora["trainable_params"] == speft["trainable_params"]  # matched budget, classifier head in both
    assert set(lora) >= {"accuracy_mean", "accuracy_std", "seeds", "train_time_s", "peak_memory_bytes"}
    assert "| speft-gradient |" in capsys.readouterr().out
    assert output.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    quality.main(args + ["--resume"])  # nothing left to run: the same two runs, none repeated
    assert len(json.loads(output.read_text())["runs"]) == 2


def test_every_variant_maps_to_recipe_flags():
    assert set(quality.MEASURES) <= {variant.get("salience") for variant in quality.VARIANTS.values()}
    assert all(quality.learning_rate(variant) > 0 for variant in quality.VARIANTS)
    args = quality.parse_args(["--model_name_or_path", "m", "--data_dir", "hub"])
    for variant, flags in quality.VARIANTS.items():  # each command is one the recipe accepts, with the variant's flags
        recipe_args, method, training = glue.make_parser().parse_args_and_config(
            quality.recipe_command(args, variant, 0, quality.learning_rate(variant), "out")[2:])
        glue.check_arguments(recipe_args, method)
        assert {name: getattr(method, name) for name in flags} == flags, variant
        assert training.learning_rate == quality.learning_rate(variant)
    command = quality.recipe_command(args, "speft-gradient-dynamic-local", 1, 1e-3, "out")

    def flag(name: str) -> str:
        return command[command.index(f"--{name}") + 1]

    assert flag("mask_update") == "dynamic" and flag("mask_scope") == "local" and flag("seed") == "1"
    assert "--dataset_path" not in command and flag("max_train_samples") == "8000"
    hybrid = quality.recipe_command(args, "speft+lora-gradient", 0, 2e-3, "out")
    assert hybrid[hybrid.index("--method") + 1] == "speft+lora" and "--salience_batches" in hybrid
    sweep = quality.planned_runs(quality.parse_args(["--model_name_or_path", "m", "--data_dir", "hub", "--sweep"]))
    assert {seed for _, seed, _ in sweep} == {quality.SWEEP_SEED}
    assert len(sweep) == sum(map(len, quality.SWEEP_GRID.values()))
