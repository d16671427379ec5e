"""examples/demo.py (`make demo`) in a quick mode on the real SmolLM2-135M weights: what it prints, its exit code
(0 when SPEFT's held-out NLL falls, 1 when it does not, 2 on bad arguments), and the GSM8K slice it ships."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

spec = importlib.util.spec_from_file_location("speft_demo", ROOT / "examples" / "demo.py")
demo = sys.modules["speft_demo"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

QUICK = ["--steps", "2", "--batch_size", "2", "--eval_problems", "2", "--salience_batches", "1", "--max_length", "128",
         "--max_new_tokens", "4", "--rank", "2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Shared by the runs, so SmolLM2's GGUF is converted once."""
    return tmp_path_factory.mktemp("demo")


def held_out_nll(output: str, method: str) -> tuple[float, float]:
    match = re.search(rf"^{method} .* (\d+\.\d+) -> (\d+\.\d+) \(", output, re.MULTILINE)
    assert match, output
    return float(match.group(1)), float(match.group(2))


def test_quick_demo_learns_and_checks_the_adapter(workdir, capsys):
    assert demo.main([*QUICK, "--learning_rate", "2e-3", "--workdir", str(workdir)]) == 0
    output = capsys.readouterr().out
    speft_before, speft_after = held_out_nll(output, "SPEFT")
    lora_before, _ = held_out_nll(output, "LoRA")
    assert speft_after < speft_before and lora_before == speft_before  # one base NLL, the same held-out problems
    counts = re.findall(r"^(?:SPEFT|LoRA) +([\d,]+) ", output, re.MULTILINE)
    assert len(counts) == 2 and counts[0] == counts[1]  # the same budget
    assert "lr 0.002 for SPEFT, 0.003 for LoRA" in output and "before: " in output and "after (SPEFT): " in output
    assert "SPEFT: magnitude salience, the budget of peft's LoRA r=2" in output  # the causal-LM default: data-free
    mask = output.split("density per layer and module:\n")[1].split("scale:")[0].splitlines()
    header = mask[0].split()
    assert header[0] == "layer" and sorted(header[1:]) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
    assert len(mask) == 1 + 30  # 30 layers
    assert re.search(r"reloaded on a fresh base = trained .* merged = unmerged", output)
    if importlib.util.find_spec("matplotlib"):  # the [plot] extra
        assert f"wrote {workdir / 'speft_mask.png'}" in output and (workdir / "speft_mask.png").stat().st_size > 0
    assert re.search(r"^took \d+ s$", output, re.MULTILINE) and output.rstrip().endswith("RESULT: OK")


def test_prepare_model_converts_once_and_trains_nothing(workdir, capsys):
    """`make install` prepares the demo's weights this way, so that `make demo` times training, not conversion."""
    folder = workdir / "smollm2"  # converted by the first test of this module (or now)
    assert demo.main(["--prepare_model", "--model_dir", str(folder)]) == 0
    output = capsys.readouterr().out
    assert output.strip().endswith(f"SmolLM2-135M-Instruct is ready in {folder}") and "held-out" not in output
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_exit_code_is_1_when_the_held_out_nll_does_not_fall(workdir, capsys):
    assert demo.main([*QUICK, "--learning_rate", "0", "--no_lora", "--salience", "gradient",
                      "--workdir", str(workdir)]) == 1
    output = capsys.readouterr().out
    assert "SPEFT: gradient salience on 1 batches" in output  # a data-dependent measure calibrates first
    before, after = held_out_nll(output, "SPEFT")
    assert after == pytest.approx(before) and not re.search(r"^LoRA ", output, re.MULTILINE)  # --no_lora
    assert "RESULT: FAILED: not SPEFT's held-out NLL fell" in output


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be a positive count, got 0"),
    (["--learning_rate", "-1"], "--learning_rate must be >= 0, got -1.0"),
    (["--lora_learning_rate", "-0.5"], "--lora_learning_rate must be >= 0, got -0.5"),
    (["--dataset_path", "no/such/folder"], "--dataset_path no/such/folder is not a folder"),
    (["--prepare_model"], "--prepare_model needs --model_dir"),
])
def test_bad_arguments_exit_2_before_work(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        demo.main(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_the_shipped_slice_is_what_source_md_says():
    folder = ROOT / "examples" / "data" / "gsm8k"
    source = (folder / "SOURCE.md").read_text()
    assert "3101c7d5072418e28b9008a6636bde82a006892c" in source and (folder / "LICENSE").read_text().startswith("MIT")
    for name in ("train.jsonl", "test.jsonl"):
        data = (folder / name).read_bytes()
        lines, size, digest = re.search(rf"\| {name} \| (\d+) \| (\d+) \| ([0-9a-f]{{64}}) \|", source).groups()
        assert (data.count(b"\n"), len(data), hashlib.sha256(data).hexdigest()) == (int(lines), int(size), digest)
        assert len(demo.gsm8k.read_gsm8k_jsonl(str(folder / name))) == int(lines)
