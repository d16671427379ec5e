"""recipes/glue.py: GLUE metrics against hand-computed values, data errors, and the recipe end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import torchrun_two_processes
from encoder_helpers import build_tiny_encoder, write_sst2

RECIPE = Path(__file__).parents[1] / "recipes" / "glue.py"
spec = importlib.util.spec_from_file_location("glue_recipe", RECIPE)
glue = sys.modules["glue_recipe"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(glue)

def test_classification_metrics_by_hand():
    predictions, labels = torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 0, 1, 1])
    # tp=2 fp=1 tn=1 fn=1
    assert glue.glue_metrics("mrpc", predictions, labels) == pytest.approx({"accuracy": 0.6, "f1": 4 / 6})
    mcc = (2 * 1 - 1 * 1) / (3 * 3 * 2 * 2) ** 0.5
    assert glue.glue_metrics("cola", predictions, labels)["matthews_correlation"] == pytest.approx(mcc)


def test_regression_metrics_by_hand():
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 5.0])
    metrics = glue.glue_metrics("stsb", x, y)
    xm, ym = x - x.mean(), y - y.mean()
    assert metrics["pearson"] == pytest.approx(float((xm * ym).sum() / (xm.norm() * ym.norm())))
    assert metrics["spearmanr"] == pytest.approx(0.8)  # ranks 1,2,3,4 vs 1,3,2,4
    ties = glue.glue_metrics("stsb", torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert ties["spearmanr"] == pytest.approx(0.8660254)  # tied ranks 1.5, 1.5, 3


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def glue_args(model_dir, data_dir, output_dir, method, *extra):
    return ["--model_name_or_path", str(model_dir), "--task", "sst2", "--dataset_path", str(data_dir), "--method",
            method, "--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-2", "--lora_r", "2", "--salience_batches", "2", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "True", *extra]


def test_resume_from_a_checkpoint_folder_continues_the_run(tmp_path, tiny_encoder_dir, monkeypatch):
    """`--resume_from_checkpoint <folder>`: steps, losses and metrics as in the run that did not stop; steps 1-2 and
    salience do not run again."""
    import hf_speft.training.updater

    data = write_sst2(tmp_path / "sst2")
    every_2 = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"]
    glue.main(glue_args(tiny_encoder_dir, data, tmp_path / "full", "speft", *every_2))
    monkeypatch.setattr(hf_speft.training.updater, "calibrate", lambda *args, **kwargs: pytest.fail("calibrated"))
    glue.main(glue_args(tiny_encoder_dir, data, tmp_path / "resumed", "speft", *every_2, "--resume_from_checkpoint",
                        str(tmp_path / "full" / "checkpoint-2")))
    full, resumed = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("full", "resumed"))
    assert resumed["training"]["steps"] == full["training"]["steps"] == 4
    assert len(full["train_losses"]) == 4 and resumed["train_losses"] == full["train_losses"]
    assert resumed["metrics"] == full["metrics"]
    assert sorted(path.name for path in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-4"]


@pytest.mark.parametrize("method", ["speft", "speft+lora", "lora", "full"])
def test_glue_recipe_end_to_end(tmp_path, tiny_encoder_dir, method):
    data = write_sst2(tmp_path / "sst2")
    micro = ["--salience_micro_batch_size", "3"] if method.startswith("speft") else []
    glue.main(glue_args(tiny_encoder_dir, data, tmp_path / "out", method, *micro))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["task"] == "sst2" and saved["method"] == method and saved["num_eval"] == 32
    assert 0 <= saved["metrics"]["accuracy"] <= 1 and saved["trainable_params"] > 0
    if micro:
        adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert adapter_config["salience_micro_batch_size"] == 3
        assert saved["salience_seconds"] > 0


@pytest.mark.parametrize(("content", "message"), [
    ("sentence\tlabel\nfine movie\tx\n", "line 2: label 'x' is not a number"),
    ("sentence\tlabel\n\t1\n", "line 2: missing \\['sentence'\\]"),
])
def test_malformed_tsv_names_file_and_line(tmp_path, content, message):
    (tmp_path / "train.tsv").write_text(content)
    with pytest.raises(glue.RecipeError, match=message):
        glue.read_split(str(tmp_path), "train", "sst2")
    with pytest.raises(glue.RecipeError, match="dev.tsv \\(or .jsonl\\) does not exist"):
        glue.read_split(str(tmp_path), "dev", "sst2")


@pytest.mark.parametrize(("extra", "message"), [(["--task", "squad"], "--task 'squad'"),
                                                (["--method", "full", "--num_params", "5"], "--num_params sets")])
def test_bad_glue_arguments(tmp_path, tiny_encoder_dir, extra, message):
    with pytest.raises(glue.RecipeError, match=message):
        glue.main(glue_args(tiny_encoder_dir, write_sst2(tmp_path / "d"), tmp_path / "out", "speft") + extra)


def test_train_subset_test_file_and_run_facts(tmp_path, tiny_encoder_dir):
    data = write_sst2(tmp_path / "sst2")
    extra = write_sst2(tmp_path / "extra", size=12) / "dev.tsv"
    args = glue_args(tiny_encoder_dir, data, tmp_path / "out", "lora", "--max_train_samples", "10", "--test_file",
                     str(extra), "--logging_steps", "1")
    saved = glue.main(args)
    assert saved["num_train"] == 10 and saved["num_test"] == 12 and 0 <= saved["test_metrics"]["accuracy"] <= 1
    assert saved["peak_memory_bytes"] > 0 and len(saved["train_losses"]) == 3
    first, again = glue.load_glue(glue.GlueArguments("m", dataset_path=str(data), max_train_samples=10))[0], \
        glue.load_glue(glue.GlueArguments("m", dataset_path=str(data), max_train_samples=10))[0]
    assert first == again  # the same fixed subset in every run


@pytest.mark.parametrize(("extra", "message"), [(["--max_train_samples", "0"], "--max_train_samples must be"),
                                                (["--test_file", "/nonexistent/test.tsv"], "test.tsv does not exist"),
                                                (["--test_file", __file__], "use a .tsv")])
def test_bad_subset_and_test_file(tmp_path, tiny_encoder_dir, extra, message):
    with pytest.raises(glue.RecipeError, match=message):
        glue.main(glue_args(tiny_encoder_dir, write_sst2(tmp_path / "d"), tmp_path / "out", "lora") + extra)


@pytest.mark.slow
def test_glue_recipe_on_two_processes(tmp_path, tiny_encoder_dir):
    data = write_sst2(tmp_path / "sst2")
    torchrun_two_processes(RECIPE, glue_args(tiny_encoder_dir, data, tmp_path / "out", "speft"))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["world_size"] == 2 and saved["num_eval"] == 32  # every dev example scored once
