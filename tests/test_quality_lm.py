"""benchmarks/quality_lm.py --quick on a tiny Llama: the plan (sweep on validation, then the chosen rate's sweep run
scored in full from its saved weights and two more seeds, then the ablation), resuming, the JSON, the tables and the
plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HARNESS = Path(__file__).parents[1] / "benchmarks" / "quality_lm.py"
spec = importlib.util.spec_from_file_location("quality_lm_benchmark", HARNESS)
quality_lm = sys.modules["quality_lm_benchmark"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality_lm)


def tiny_checkpoint(folder: Path) -> Path:
    """A 2-layer Llama with a byte-level tokenizer (no merges: one token per byte)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, **{char: 2 + i for i, char in enumerate(sorted(alphabet))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 eos_token_id=1, pad_token_id=0, bos_token_id=None)).save_pretrained(folder)
    return folder


def write_data(folder: Path) -> tuple[Path, Path]:
    folder.mkdir()
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many?", "answer": f"{a} + {b} = {a + b}\n#### "
             f"{a + b}"} for a in range(4) for b in range(4)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (folder / "ood.txt").write_text("the movie was good\nit is slow , very slow\n")
    return folder, folder / "ood.txt"


@pytest.mark.slow
def test_quick_run_sweeps_on_validation_then_seeds_then_ablation_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny ops: threads only wait on each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data, ood = write_data(tmp_path / "data")
    output = tmp_path / "quality_lm.json"
    common = ["--quick", "--data", str(data), "--ood", str(ood), "--model_dir", str(tiny_checkpoint(tmp_path / "m")),
              "--output", str(output), "--cache_dir", str(tmp_path / "cache"),
              "--methods", "speft-gradient", "lora", "shira", "full"]
    quality_lm.main(common + ["--max_runs", "1"])  # the base model, in a fresh process like every real run
    first = json.loads(output.read_text())
    assert [run["method"] for run in first["runs"]] == ["base"] and first["state"]["runs_done"] == 1
    assert first["state"]["runs_planned"] == 1 + 4 * 3 + 4 * 2 and not first["state"]["complete"]

    result = quality_lm.main(common + ["--in_process"])
    assert result["state"] == {"runs_done": 21, "runs_planned": 21, "complete": True}
    runs = result["runs"]
    for method in ("speft-gradient", "lora", "shira", "full"):
        sweep = {run["learning_rate"]: run for run in runs if run["method"] == method and run["seed"] == 0}
        assert sorted(sweep) == quality_lm.GRIDS[method]
        chosen = min(sweep, key=lambda rate: sweep[rate]["val_nll"])  # validation, never the test problems
        assert result["chosen_learning_rates"][method] == chosen
        assert sorted(run["seed"] for run in runs if run["method"] == method and run["learning_rate"] == chosen) \
            == [0, 1, 2]
        assert sweep[chosen]["scored_from"] == "the sweep run's weights" and sweep[chosen]["test_nll"] > 0
        assert all(sweep[rate]["test_nll"] is None for rate in sweep if rate != chosen)  # validation only
    budgets = {row["method"]: row["trainable_params"] for row in result["summary"]}
    assert budgets["speft-gradient"] == budgets["lora"] == budgets["shira"] < budgets["full"]
    for run in runs[1:]:
        assert len(run["losses"]) == 2 and run["step_seconds"] > 0 and run["peak_train_rss_bytes"] > 0
        assert (run["salience_seconds"] > 0) == run["method"].startswith("speft")
        assert run["residual_entries"] == 0  # static masks: the adapter holds the trainable values only
        assert run["val_nll"] > 0
        if run["test_nll"] is not None:
            assert 0 <= run["strict_match"] <= 1 and run["test_nll"] > 0 and run["ood_nll"] > 0
    lora_seeds = {run["seed"]: run["test_nll"] for run in runs if run["method"] == "lora"
                  and run["learning_rate"] == result["chosen_learning_rates"]["lora"]}
    assert len(set(lora_seeds.values())) == 3  # seeds differ (data order, initialisation)
    assert all(run["val_nll"] != runs[0]["val_nll"] for run in runs[1:])  # training changed the model
    scored = [run for run in runs[1:] if run["test_nll"] is not None]
    assert len(scored) == 4 * 3 and all(run["test_nll"] != runs[0]["test_nll"] for run in scored)
    assert output.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    table = quality_lm.markdown_tables(result)
    assert "Runs done: 21 of 21." in table and "| shira |" in table and "| base model |" in table
    assert "not run yet" not in quality_lm.headline_row(result) and quality_lm.headline_row(first).count("not run") == 2

    capsys.readouterr()
    again = quality_lm.main(common + ["--in_process"])  # nothing left: no run is redone
    assert again["runs"] == runs and "[" not in capsys.readouterr().out.split("Runs done")[0]

    ablated = quality_lm.main(common + ["--in_process", "--ablation", "--max_runs", "2"])
    rate = result["chosen_learning_rates"]["speft-gradient"]
    assert [(run["method"], run["learning_rate"]) for run in ablated["runs"][21:]] == [
        (name, rate) for name in list(quality_lm.ABLATIONS)[:2]]
    promoted = quality_lm.promoted_ablations(ablated["runs"], rate)
    assert set(promoted) <= set(list(quality_lm.ABLATIONS)[:2])  # only screened levers earn more seeds
    assert ablated["state"]["runs_planned"] == 21 + len(quality_lm.ABLATIONS) + 2 * len(promoted)
    assert ablated["runs"][21]["test_nll"] != ablated["runs"][22]["test_nll"]  # a lever changes the result
    torch.set_num_threads(threads)


def test_only_levers_that_beat_speft_on_validation_earn_more_seeds():
    first, second, *_ = quality_lm.ABLATIONS
    def run(method, val_nll, test_nll, rate=1e-3, seed=0):
        return {"method": method, "learning_rate": rate, "seed": seed, "val_nll": val_nll, "test_nll": test_nll}
    runs = [run("speft-gradient", 0.9, 0.9), run(first, 0.8, 1.5), run(second, 0.95, 0.1),
            run(second, 0.1, 0.1, rate=3e-3), run(second, 0.1, 0.1, seed=1)]
    assert quality_lm.promoted_ablations(runs, 1e-3) == [first]  # by validation NLL, at the chosen rate, seed 0
    assert quality_lm.promoted_ablations(runs[1:], 1e-3) == []  # no reference run yet: nothing earns seeds


def test_bad_paths_fail_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        quality_lm.parse_args(["--data", str(tmp_path)])
    assert "--data" in capsys.readouterr().err


@pytest.mark.slow
def test_autocast_runs_and_a_results_file_resumes_only_with_its_own_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data, ood = write_data(tmp_path / "data")
    output = tmp_path / "quality_lm.json"
    common = ["--quick", "--data", str(data), "--ood", str(ood), "--model_dir", str(tiny_checkpoint(tmp_path / "m")),
              "--output", str(output), "--cache_dir", str(tmp_path / "cache"), "--methods", "lora", "--in_process"]
    result = quality_lm.main(common + ["--autocast", "bfloat16", "--max_runs", "2"])  # bf16 compute on any CPU
    assert result["settings"]["autocast"] == "bfloat16" and len(result["runs"]) == 2
    assert result["runs"][1]["val_nll"] > 0 and result["runs"][1]["val_nll"] != result["runs"][0]["val_nll"]
    saved = output.read_text()
    with pytest.raises(SystemExit, match="other settings \\(autocast\\)"):
        quality_lm.main(common + ["--max_runs", "1"])  # float32 runs would mix with the bf16 ones
    assert output.read_text() == saved
