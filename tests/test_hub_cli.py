"""The model card and the `hf-speft` command line (inspect, merge, salience, plot), all offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_common import tiny_gpt2
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from test_trl import word_tokenizer
from trainer_helpers import base_model, speft_model, speft_trainer
from transformers import AutoModelForCausalLM

from hf_speft import SparsePeftConfig, sparse_layers
from hf_speft.hub import push_to_hub, summarize_adapter, update_model_card
from hf_speft.measures import available_measures
from hf_speft_cli import build_parser, main
from hf_speft_cli.common import builtin_measures


BODY = ["q_proj", "v_proj", "up_proj", "down_proj"]  # no lm_head: peft would save its base weight too


@pytest.fixture
def adapter_dir(tmp_path):
    model = speft_model(salience="magnitude", init_weights=False, target_modules=BODY)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_saved_adapter_carries_a_speft_model_card(adapter_dir):
    card = ModelCard.load(adapter_dir / "README.md")
    summary = summarize_adapter(str(adapter_dir))
    assert card.data.library_name == "peft"
    assert {"peft", "speft", "sparse-fine-tuning", "salience:magnitude"} <= set(card.data.tags)
    assert card.data.base_model is None  # built from a config: no Hub id to point at
    for module in summary.modules:
        assert f"| `{module.name}` | {module.shape[0]}×{module.shape[1]} | {module.nnz:,} |" in card.text
    assert f"{summary.nnz:,} trainable weights" in card.text
    # Refreshing is idempotent, a Hub id becomes base_model metadata, training facts stay on later saves.
    update_model_card(str(adapter_dir), base_model="org/base-model", training={"train_loss": 1.5})
    update_model_card(str(adapter_dir))
    card = ModelCard.load(adapter_dir / "README.md")
    assert card.data.base_model == "org/base-model"
    assert card.text.count("## SPEFT adapter") == 1 and "- train_loss: 1.5" in card.text


def test_saved_card_has_no_placeholders_or_local_paths(tmp_path):
    """peft's template (39 "[More Information Needed]" lines) is replaced; a local base path is never written."""
    torch.manual_seed(0)
    base = tmp_path / "my-local-base"
    base_model().save_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), SparsePeftConfig(
        target_modules=["q_proj"], salience="magnitude"))
    assert model.peft_config["default"].base_model_name_or_path == str(base)
    model.save_pretrained(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert "More Information Needed" not in card.text and str(base) not in str(card) and "None" not in card.text
    assert "a local base model" in card.text and card.text.lstrip().startswith("# adapter: a SPEFT adapter")
    assert "licence" not in card.data.to_dict() and card.data.base_model is None

    (tmp_path / "adapter" / "README.md").unlink()  # a folder without a card gets a fresh one
    card = update_model_card(str(tmp_path / "adapter"))
    assert card.data.library_name == "peft" and "## SPEFT adapter" in card.text

    (tmp_path / "adapter" / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nWritten by hand.\n")
    card = update_model_card(str(tmp_path / "adapter"))
    assert "Written by hand." in card.text and "## SPEFT adapter" in card.text and card.data.license == "mit"
    assert card.data.library_name == "peft"


def test_push_to_hub_publishes_adapter_and_card(monkeypatch, tmp_path):
    """Everything up to the network call is real; only the Hub API calls are replaced."""
    import huggingface_hub

    uploaded = {}

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}
        return "commit"

    def no_remote_card(*args, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError("the new repo has no README.md yet")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://hf.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", no_remote_card)
    model = speft_model(salience="magnitude", target_modules=BODY)
    assert push_to_hub(model, "user/speft-adapter", base_model="org/base", training={"data": "counting"}) == "commit"

    assert uploaded["repo_id"] == "user/speft-adapter"
    assert set(uploaded["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    card = ModelCard(uploaded["files"]["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == "org/base"
    assert {"peft", "speft", "sparse-fine-tuning", "salience:magnitude"} <= set(card.data.tags)
    assert 'AutoPeftModel.from_pretrained("user/speft-adapter")' in card.text and "- data: counting" in card.text


def test_trainer_model_card_has_training_facts(tmp_path):
    trainer = speft_trainer(speft_model(), tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(dataset="counting")
    card = ModelCard.load(tmp_path / "README.md")
    assert "## SPEFT adapter" in card.text
    assert "- steps: 2" in card.text and "- data: counting" in card.text and "train_loss" in card.text
    assert "- learning rate: 0.05" in card.text and "- precision: fp32" in card.text and "- seed: 0" in card.text
    # trl's/transformers' generated text (placeholders, "fine-tuned version of [None]", a chat example) is replaced
    assert "More Information Needed" not in card.text and "[None]" not in card.text and "Quick start" not in card.text


def test_inspect_text_and_json(adapter_dir, capsys):
    assert main(["inspect", str(adapter_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = speft_model(salience="magnitude", target_modules=BODY)
    assert data["nnz"] == sum(layer.speft_values["default"].numel() for layer in sparse_layers(model).values())
    assert data["config"]["salience"] == "magnitude" and len(data["modules"]) == len(sparse_layers(model))
    assert main(["inspect", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "LoRA-equivalent rank" in out and "model.layers.0.self_attn.q_proj" in out


@pytest.mark.parametrize("command", [["inspect"], ["plot"], ["merge", "base"]])
def test_missing_or_corrupt_adapter_is_a_clean_error(tmp_path, capsys, command):
    extra = [str(tmp_path / "out")] if command[0] == "merge" else []
    assert main([*command, str(tmp_path / "nowhere"), *extra]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json is missing" in err and "Traceback" not in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    assert main([*command, str(tmp_path / "bad"), *extra]) == 2
    assert "Cannot read the adapter" in capsys.readouterr().err
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "SPEFT"}')  # config fine, weights not
    assert main([*command, str(tmp_path / "bad"), *extra]) == 2
    err = capsys.readouterr().err
    assert "Cannot read the adapter" in err and "Traceback" not in err


@pytest.mark.parametrize("family", ["llama", "gpt2-conv1d"])
def test_merge_streams_shards_and_equals_merge_and_unload(tmp_path, family):
    torch.manual_seed(0)
    base = base_model() if family == "llama" else tiny_gpt2()
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_proj"]
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()  # really several shards
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), SparsePeftConfig(
        target_modules=targets, density=0.1, salience="magnitude", init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = model.merge_and_unload().eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits)

    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "half"),
                 "--dtype", "bf16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "half").dtype == torch.bfloat16


def test_merge_refuses_a_different_base(tmp_path, adapter_dir, capsys):
    tiny_gpt2().save_pretrained(tmp_path / "other")
    assert main(["merge", str(tmp_path / "other"), str(adapter_dir), str(tmp_path / "merged")]) == 2
    assert "no weights for adapter modules" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()  # a failed merge writes nothing
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".merged")]


def test_salience_command_saves_a_trainable_mask(tmp_path, capsys):
    base_model().save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"count : {i} {i + 1}", "completion": f" {i + 2} {i + 3}"} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    command = ["salience", str(tmp_path / "model"), str(tmp_path / "data.jsonl"), "--measure", "gradient",
               "--num_params", "100", "--batches", "2", "--batch_size", "4", "--out", str(tmp_path / "mask"),
               "--target_modules", "q_proj", "v_proj"]
    assert main(command) == 0
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "mask", is_trainable=True)
    assert sum(layer.speft_values["default"].numel() for layer in sparse_layers(loaded).values()) == 100
    assert summarize_adapter(str(tmp_path / "mask")).config["salience"] == "gradient"
    assert main(command + ["--out", str(tmp_path / "micro"), "--micro_batch_size", "1"]) == 0
    assert summarize_adapter(str(tmp_path / "micro")).config["salience_micro_batch_size"] == 1
    micro = PeftModel.from_pretrained(base_model(), tmp_path / "micro")
    for name, layer in sparse_layers(micro).items():  # the same mask from one row at a time
        assert torch.equal(layer.speft_indices["default"], sparse_layers(loaded)[name].speft_indices["default"])

    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{broken\n")
    bad = command.copy()
    bad[2] = str(tmp_path / "bad.jsonl")
    assert main(bad) == 2
    assert "bad.jsonl, line 2: not valid JSON" in capsys.readouterr().err
    bad[2], bad[4] = str(tmp_path / "data.jsonl"), "gradientt"
    with pytest.raises(SystemExit) as exited:  # argparse: the built-in measures are its choices
        main(bad)
    assert exited.value.code == 2 and "invalid choice: 'gradientt'" in capsys.readouterr().err


def test_plot_writes_a_png(adapter_dir, tmp_path):
    assert main(["plot", str(adapter_dir), "--out", str(tmp_path / "mask.png")]) == 0
    assert (tmp_path / "mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_help():
    script = Path(sys.executable).parent / "hf-speft"
    assert "from hf_speft_cli import main" in script.read_text()  # pyproject's entry point (stale: reinstall)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in ("inspect", "merge", "salience", "plot"):
        assert command in result.stdout
    assert "examples:" in result.stdout


def one_line_error(capsys, command: str) -> str:
    """The whole of stderr, checked to be one `hf-speft COMMAND: error: ...` line."""
    err = capsys.readouterr().err
    assert err.startswith(f"hf-speft {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_every_command_reports_a_bad_path_in_one_line(tmp_path, adapter_dir, capsys, monkeypatch):
    """A missing folder is named as missing (not quoted back with the Hub's repo-id rules), a Hub id that cannot be
    reached offline is one line too; exit code 2 for all."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "data.txt").write_text("some text\n")
    missing, out = str(tmp_path / "no" / "such"), str(tmp_path / "out")
    cases = [(["inspect", missing], "adapter_config.json is missing"),
             (["plot", missing], "adapter_config.json is missing"),
             (["compose", missing, "--out", out], "adapter_config.json is missing"),
             (["merge", missing, str(adapter_dir), out], f"The base model folder {missing!r} does not exist"),
             (["salience", missing, str(tmp_path / "data.txt"), "--density", "0.1", "--out", out],
              f"The model folder {missing!r} does not exist"),
             (["estimate", missing], f"The model folder {missing!r} does not exist"),
             (["estimate", "hf-speft-tests/no-such-model"], "Cannot read the config of 'hf-speft-tests/no-such-model'")]
    for command, expected in cases:
        assert main(command) == 2, command
        err = one_line_error(capsys, command[0])
        assert expected in err and "Repo id must" not in err, err
    assert not os.path.exists(out)


def test_merge_refuses_a_non_empty_output_folder_unless_overwrite(tmp_path, adapter_dir, capsys):
    base_model().save_pretrained(tmp_path / "base")
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("mine")
    command = ["merge", str(tmp_path / "base"), str(adapter_dir), str(merged)]
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(command) == 2
    assert "pass --overwrite" in one_line_error(capsys, "merge")
    assert [path.name for path in merged.iterdir()] == ["notes.txt"] and (merged / "notes.txt").read_text() == "mine"
    assert main(command + ["--overwrite"]) == 0
    assert not (merged / "notes.txt").exists()  # replaced as a whole: no stale shard of an older merge survives
    AutoModelForCausalLM.from_pretrained(merged)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".merged")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", str(tmp_path / "base"), str(adapter_dir), str(empty)]) == 0  # nothing there to lose


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_merge_and_compose_folders_get_the_umask_mode(tmp_path, adapter_dir, umask):
    """As `save_pretrained`'s `os.makedirs` does, not the 700 of the temporary folder they are staged in."""
    base_model().save_pretrained(tmp_path / "base")
    old = os.umask(umask)
    try:
        assert main(["merge", str(tmp_path / "base"), str(adapter_dir), str(tmp_path / "merged")]) == 0
        assert main(["compose", str(adapter_dir), str(adapter_dir), "--out", str(tmp_path / "composed")]) == 0
        (tmp_path / "made").mkdir()
    finally:
        os.umask(old)
    for name in ("merged", "composed", "made"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o777 & ~umask, name


def test_help_describes_every_argument_and_shows_defaults():
    commands = {name: parser for action in build_parser()._subparsers._group_actions
                for name, parser in action.choices.items()}
    helps = {name: " ".join(parser.format_help().split()) for name, parser in commands.items()}
    for name, parser in commands.items():
        undocumented = [action.dest for action in parser._actions if not action.help]
        assert not undocumented, (name, undocumented)
    assert set(builtin_measures()) <= set(available_measures()) and "gradient" in builtin_measures()
    assert f"one of: {', '.join(builtin_measures())} (default: gradient)" in helps["salience"]
    assert "relative to the current folder" in helps["plot"] and "(default: mask.png)" in helps["plot"]
    assert "(default: speft lora full)" in helps["estimate"]
    assert "tokens per sequence (default: 512)" in helps["estimate"]
    assert "a saved SPEFT adapter folder" in helps["inspect"]


def test_saving_and_composing_print_no_card_metadata_warning(tmp_path, capfd, caplog):
    """Our card handling writes a card with a metadata block, so huggingface_hub never warns that it found none."""
    model = speft_model(salience="magnitude", init_weights=False, target_modules=BODY)
    capfd.readouterr()
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "adapter")  # over its own card
    assert main(["compose", str(tmp_path / "adapter"), str(tmp_path / "adapter"), "--out", str(tmp_path / "c")]) == 0
    update_model_card(str(tmp_path / "c"), training={"train_loss": 1.0})
    (tmp_path / "c" / "README.md").write_text("# written by hand, no metadata\n")
    card = update_model_card(str(tmp_path / "c"))
    assert "written by hand" in card.text and card.data.library_name == "peft"
    shown = capfd.readouterr().err + caplog.text  # outside pytest the log record reaches stderr
    assert "metadata block was not found" not in shown, shown
