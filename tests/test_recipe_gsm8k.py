"""recipes/gsm8k.py: answer extraction, data and argument errors, and the recipe end to end for every method (one
process and two)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import torchrun_two_processes
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import ModelConfig, SFTConfig, TrlParser

from recipe_utils import MethodArguments

RECIPE = Path(__file__).parents[1] / "recipes" / "gsm8k.py"
spec = importlib.util.spec_from_file_location("gsm8k_recipe", RECIPE)
gsm8k = sys.modules["gsm8k_recipe"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gsm8k)

PROBLEMS = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 4), (10, 5), (7, 8), (2, 9), (6, 6), (12, 1), (4, 4), (9, 3)]
]


@pytest.mark.parametrize(("output", "strict", "flexible"), [
    ("so the total is 1,000 dollars.\n#### 1,000", "1,000", "1,000"),
    ("It costs $1,000.", None, "$1,000."),
    ("The change is -5 degrees. #### -5", "-5", "-5"),
    ("He runs 2.5 miles then 3.75 miles.", None, "3.75"),
    ("I do not know.", None, None),
])
def test_answer_extraction(output, strict, flexible):
    assert gsm8k.strict_answer(output) == strict
    assert gsm8k.flexible_answer(output) == flexible


def test_score_normalises_like_lm_eval():
    answers = ["... \n#### 1000", "#### -5", "#### 3", "#### 42"]
    outputs = ["#### 1,000", "it is -5.", "no number", "#### 41 but really 42"]
    metrics = gsm8k.score(outputs, answers)
    assert metrics["strict_match"] == 1 / 4  # only "#### 1,000" (commas ignored)
    assert metrics["flexible_extract"] == 3 / 4  # 1,000 / -5. / 42
    assert metrics["average"] == pytest.approx(0.5)


def write_dataset(folder: Path, rows=PROBLEMS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder


@pytest.mark.parametrize(("content", "message"), [
    ('{"question": "q", "answer": "#### 1"}\n{broken\n', "line 2: not valid JSON"),
    ('{"question": "q"}\n', "line 1: needs string fields"),
    ('{"question": "q", "answer": "no final line"}\n', "line 1: the answer has no final '#### <number>' line"),
])
def test_malformed_data_names_file_and_line(tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        gsm8k.read_gsm8k_jsonl(str(tmp_path / "train.jsonl"))
    with pytest.raises(ValueError, match="does not exist"):
        gsm8k.read_gsm8k_jsonl(str(tmp_path / "test.jsonl"))


def build_tiny_checkpoint(folder: Path, texts: list[str], hidden: int = 32, layers: int = 2) -> None:
    """A Llama built from a config and a byte-level BPE tokenizer trained on `texts`, saved like a Hub checkpoint."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, eos_token_id=1, pad_token_id=0,
                                 bos_token_id=None)).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and byte-level BPE tokenizer (trained on the problems), saved like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    texts = [gsm8k.PROMPT.format(question=row["question"]) + " " + row["answer"] for row in PROBLEMS]
    build_tiny_checkpoint(folder, texts)
    return folder


# LoRA, PiSSA (rank 2), SPEFT (match_lora_rank=2) and SPEFT+LoRA (rank 1 + sparse) train the same number of weights
# on q_proj (32 -> 32) and v_proj (32 -> 16) of both layers.
ADAPTER_PARAMS = 2 * sum(2 * (32 + out) for out in (32, 16))


def assert_trained_adapter_loads(model_dir: Path, adapter_dir: Path) -> None:
    """The saved adapter loads on the base with every trained weight, and changes the base's output."""
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" in n or "speft_" in n) == ADAPTER_PARAMS
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        adapted = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            base = reloaded(input_ids=ids).logits
    assert not torch.allclose(adapted, base)  # trained values came back, not an untrained (identity) adapter


def recipe_args(model_dir: Path, data_dir: Path, output_dir: Path, method: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_path", str(data_dir), "--method", method,
            "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", "--learning_rate", "1e-2", "--eval_limit", "3",
            "--max_new_tokens", "6", "--lora_r", "2", "--lora_target_modules", "q_proj", "v_proj",
            "--salience_batches", "2", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "True",
            "--bf16", "False", "--logging_steps", "1", *extra]


@pytest.mark.parametrize("method", ["speft", "speft+lora", "lora", "pissa", "full"])
def test_recipe_end_to_end(tmp_path, tiny_model_dir, method):
    data = write_dataset(tmp_path / "data")
    results = gsm8k.main(recipe_args(tiny_model_dir, data, tmp_path / "out", method))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["method"] == method and saved["num_eval"] == 3 and saved["world_size"] == 1
    assert set(saved["metrics"]) == {"strict_match", "flexible_extract", "average"}
    assert all(0 <= value <= 1 for value in saved["metrics"].values())
    assert saved["train_time_s"] > 0 and saved["peak_memory_bytes"] > 0
    assert saved["config"]["method"]["method"] == method and results["trainable_params"] == saved["trainable_params"]
    if method == "full":
        assert saved["trainable_params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(
            tiny_model_dir).parameters())
        return
    assert saved["trainable_params"] == ADAPTER_PARAMS
    assert_trained_adapter_loads(tiny_model_dir, tmp_path / "out")


def test_resume_from_checkpoint_continues_the_run(tmp_path, tiny_model_dir, monkeypatch):
    """`--resume_from_checkpoint true` (the last checkpoint in --output_dir) continues step count, losses and the
    adapter as if the run had not stopped; the mask comes from the checkpoint (no salience runs again)."""
    import shutil

    import hf_speft.training.updater

    data = write_dataset(tmp_path / "data")
    every_2 = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--salience", "gradient"]
    full = gsm8k.main(recipe_args(tiny_model_dir, data, tmp_path / "full", "speft", *every_2))
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")

    def no_salience(*args, **kwargs):
        raise AssertionError("a resumed run calibrated again")

    monkeypatch.setattr(hf_speft.training.updater, "calibrate", no_salience)
    resumed = gsm8k.main(recipe_args(tiny_model_dir, data, tmp_path / "resumed", "speft", *every_2,
                                     "--resume_from_checkpoint", "true"))
    assert resumed["training"]["steps"] == full["training"]["steps"] == 4
    assert len(full["train_losses"]) == 4 and resumed["train_losses"] == full["train_losses"]
    # trl counts `num_tokens` from zero again after a resume (its counter is not checkpointed); the rest is the same
    states = [[{key: value for key, value in entry.items() if key != "num_tokens"} for entry in json.loads(
        (tmp_path / run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]]
        for run in ("full", "resumed")]
    assert [entry["step"] for entry in states[1]] == [1, 2, 3, 4] and states[0] == states[1]
    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # noqa: E731
    adapters = [PeftModel.from_pretrained(base(), tmp_path / run) for run in ("full", "resumed")]
    for (name, value), (other, resumed_value) in zip(*(model.state_dict().items() for model in adapters)):
        assert name == other and torch.equal(value, resumed_value), name


@pytest.mark.parametrize(("extra", "message"), [
    (["--resume_from_checkpoint", "true"], "--resume_from_checkpoint true: --output_dir .* holds no checkpoint"),
    (["--resume_from_checkpoint", "no/such/folder"], "--resume_from_checkpoint 'no/such/folder' is not a folder"),
    (["--method", "prefix"], "--method 'prefix' is not allowed"),
    (["--method", "lora", "--density", "0.01"], "--density sets a SPEFT budget"),
    (["--density", "0.01", "--num_params", "10"], "Give one SPEFT budget"),
    (["--hybrid_lora_r", "1"], "--hybrid_lora_r applies to --method speft\\+lora, not --method speft"),
    (["--method", "speft+lora", "--hybrid_lora_r", "0"], "--hybrid_lora_r 0 is not allowed"),
])
def test_bad_arguments_fail_before_work(tmp_path, tiny_model_dir, extra, message):
    data = write_dataset(tmp_path / "data")
    with pytest.raises(gsm8k.RecipeError, match=message):
        gsm8k.main(recipe_args(tiny_model_dir, data, tmp_path / "out", "speft") + extra)
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_dataset_file_is_a_clean_exit(tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    result = subprocess.run([sys.executable, str(RECIPE), *recipe_args(tiny_model_dir, tmp_path / "data",
                                                                       tmp_path / "out", "speft")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "train.jsonl does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("method", ["speft", "lora", "pissa", "full"])
def test_recipe_on_two_processes(tmp_path, tiny_model_dir, method):
    torchrun_two_processes(RECIPE, recipe_args(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "out",
                                             method))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["world_size"] == 2 and saved["method"] == method
    if method == "full":  # every weight saved, and trained
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
        assert trained.keys() == base.keys() and all(trained[k].shape == base[k].shape for k in base)
        assert any(not torch.equal(trained[k], base[k]) for k in base)
    else:
        assert_trained_adapter_loads(tiny_model_dir, tmp_path / "out")


@pytest.mark.slow
def test_recipe_speft_under_deepspeed_zero3(tmp_path, tiny_model_dir):
    """`--deepspeed` (TrainingArguments' own flag) on 2 processes: the model loads partitioned, SPEFT calibrates and
    trains, and the saved adapter holds every value."""
    from safetensors.torch import load_file

    config = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
              "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    torchrun_two_processes(RECIPE, recipe_args(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "out",
                                               "speft", "--deepspeed", str(tmp_path / "zero3.json")), timeout=900)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["world_size"] == 2 and saved["trainable_params"] == ADAPTER_PARAMS
    values = [v for k, v in load_file(tmp_path / "out" / "adapter_model.safetensors").items() if "speft_values" in k]
    assert sum(v.numel() for v in values) == saved["trainable_params"]
    assert_trained_adapter_loads(tiny_model_dir, tmp_path / "out")


@pytest.mark.parametrize(("name", "kind"), [("single", "NO"), ("ddp", "MULTI_GPU"), ("deepspeed_zero3", "DEEPSPEED"),
                                            ("deepspeed_zero3_offload", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(RECIPE.parent / "accelerate_configs" / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    if kind == "DEEPSPEED":  # ZeRO-3 must gather the adapter on save, or checkpoints hold empty tensors
        assert config.deepspeed_config["zero3_save_16bit_model"] is True


def test_recipe_speft_on_an_8bit_base(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "data")
    results = gsm8k.main(recipe_args(tiny_model_dir, data, tmp_path / "out", "speft", "--load_in_8bit", "True"))
    assert results["trainable_params"] == ADAPTER_PARAMS
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPEFT"
    # The adapter trained on the 8-bit base loads on the unquantized base (the exact-merge path).
    assert_trained_adapter_loads(tiny_model_dir, tmp_path / "out")


CONFIGS = Path(__file__).parents[1] / "recipes" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*_gsm8k_*.yaml")), ids=lambda path: path.stem)
def test_shipped_recipe_configs_parse_with_matched_budgets(path):
    parser = TrlParser((gsm8k.ScriptArguments, MethodArguments, SFTConfig, ModelConfig))
    # --use_cpu: this machine has no bf16 GPU, which TrainingArguments checks when parsing bf16: true
    _, method, training, model = parser.parse_args_and_config(["--config", str(path), "--use_cpu", "true"])
    method.check()
    model_key, method_name = path.stem.split("_gsm8k_")
    assert method.method == method_name
    shipped = json.loads((CONFIGS / "models" / model_key / "config.json").read_text())
    assert model.model_name_or_path == shipped["_name_or_path"]  # the estimate in the README is for this model
    assert model.lora_r == 16 and model.lora_target_modules == "all-linear"
    if method.method == "speft":
        assert method.match_lora_rank == model.lora_r and method.salience == "gradient"
        assert method.salience_batches * training.per_device_train_batch_size == 64 * 16
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 16
    chosen = json.loads((CONFIGS.parents[1] / "benchmarks" / "results" / "quality_lm.json").read_text())[
        "chosen_learning_rates"]
    assert training.learning_rate == chosen["speft-gradient" if method.method == "speft" else "lora"]  # PiSSA: LoRA's
    assert training.bf16 and training.activation_checkpointing


def without(args: list[str], *flags: str) -> list[str]:
    """`args` less each flag in `flags` and its values."""
    kept, skipping = [], False
    for arg in args:
        if arg.startswith("--"):
            skipping = arg in flags
        if not skipping:
            kept.append(arg)
    return kept


def test_documented_command_runs_without_a_gpu_with_cpu_defaults(tmp_path, tiny_model_dir, monkeypatch):
    """No --use_cpu/--bf16 on a machine without a GPU: the recipe picks use_cpu=True and fp32 instead of failing."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = without(recipe_args(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "out", "lora"),
                   "--use_cpu", "--bf16")
    _, _, training, _ = gsm8k.make_parser().parse_args_and_config(args)
    assert training.use_cpu and not training.bf16
    results = gsm8k.main(args)
    assert results["training"]["precision"] == "fp32" and results["training"]["device"] == "cpu"


@pytest.mark.parametrize(("extra", "message"), [
    (["--density", "0"], "density=0.0 is not allowed"),
    (["--salience", "gradiant"], "salience='gradiant' is not a registered measure"),
    (["--lora_target_modules", "nope_proj"], r"--lora_target_modules \[?'nope_proj'\]? matches no linear layer"),
    (["--num_params", "100000000"], "asks for 100000000 trainable weights"),
    (["--model_name_or_path", "/nowhere/model"], "Cannot load the model '/nowhere/model'"),
])
def test_bad_options_are_refused_before_any_weight_loads(tmp_path, tiny_model_dir, monkeypatch, extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    args = without(recipe_args(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "out", "speft"),
                   *[flag for flag in extra if flag.startswith("--")])
    with pytest.raises(gsm8k.RecipeError, match=message):
        gsm8k.main(args + extra)


def test_a_bad_option_is_one_line_and_exit_code_2(tmp_path, tiny_model_dir):
    args = recipe_args(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "out", "speft")
    result = subprocess.run([sys.executable, str(RECIPE), *args, "--salience", "gradiant"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "gsm8k.py: error: salience='gradiant' is not a registered measure" in result.stderr


def test_results_record_training_facts_predictions_and_the_score_before_training(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "data")
    gsm8k.main(recipe_args(tiny_model_dir, data, tmp_path / "out", "speft", "--eval_before", "True",
                           "--max_train_samples", "5", "--seed", "7", "--max_length", "64"))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    training = saved["training"]
    assert training["learning_rate"] == 1e-2 and training["steps"] == 2 and training["max_steps"] == 2
    assert training["per_device_train_batch_size"] == 4 and training["effective_batch_size"] == 4
    assert training["max_length"] == 64 and training["precision"] == "fp32" and training["seed"] == 7
    assert saved["num_train"] == 5 and set(saved["metrics_before_training"]) == set(saved["metrics"])
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == saved["num_eval"] == 3
    assert records[0]["question"] == PROBLEMS[0]["question"] and records[0]["gold"] == "7"
    assert {"output", "strict", "flexible", "strict_correct", "flexible_correct"} <= set(records[0])
    strict = sum(record["strict_correct"] for record in records) / len(records)
    assert strict == saved["metrics"]["strict_match"]
    assert gsm8k.fixed_subset(list(range(8)), 5) == gsm8k.fixed_subset(list(range(8)), 5) != list(range(5))
    card = (tmp_path / "out" / "README.md").read_text()  # the real prompt format, the settings and the scores
    assert "More Information Needed" not in card and str(tiny_model_dir) not in card
    assert "`Question: {question}\\nAnswer:`" in card and "- learning rate: 0.01" in card
    assert f"strict-match {saved['metrics']['strict_match']:.3f}" in card and "before training" in card
