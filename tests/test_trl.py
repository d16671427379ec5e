"""trl: `SpeftSFTTrainer` trains a SPEFT adapter on prompt-completion data with completion-only loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from testing_common import doc_examples, run_doc_example
from trainer_helpers import base_model, counting_dataset, speft_model
from transformers import PreTrainedTokenizerFast, default_data_collator
from trl import SFTConfig

import hf_speft
from hf_speft import sparse_layers
from hf_speft.config import DEFAULT_SALIENCE

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # trl refuses adapters on lm_head


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "count": 3, ":": 4, **{str(i): 5 + i for i in range(50)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def counting_prompts(size: int = 64) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for start in torch.randint(0, 40, (size,), generator=generator).tolist():
        rows.append({"prompt": "count : " + " ".join(str(start + i) for i in range(3)),
                     "completion": " " + " ".join(str(start + i) for i in range(3, 6))})
    return Dataset.from_list(rows)


def test_sft_trainer_completion_only_loss_and_reload(tmp_path):
    model = speft_model(target_modules=TARGETS)
    tokenizer = word_tokenizer()
    args = SFTConfig(str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-2, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, completion_only_loss=True)
    trainer = hf_speft.SpeftSFTTrainer(model=model, args=args, train_dataset=counting_prompts(),
                                       processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    prompt_length = len(tokenizer("count : 1 2 3")["input_ids"])
    assert (batch["labels"][:, :prompt_length] == -100).all()  # the prompt is not trained on
    assert (batch["labels"][:, prompt_length:] != -100).any()

    trainer.train()
    assert trainer.state.log_history[0]["speft/trainable_params"] > 0
    values = torch.cat([layer.speft_values["default"].detach() for layer in sparse_layers(model).values()])
    assert values.abs().sum() > 0

    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter")
    trained, reloaded = sparse_layers(model), sparse_layers(loaded)
    for name, layer in trained.items():  # (the trained model's forward stays under accelerate's bf16 autocast)
        assert torch.equal(reloaded[name].speft_indices["default"], layer.speft_indices["default"])
        assert torch.equal(reloaded[name].speft_values["default"], layer.speft_values["default"])


def test_sft_trainer_takes_a_model_path_and_peft_config_like_trl(tmp_path):
    """trl's convention: SFTTrainer(model="org/model" or a path, peft_config=...); trl loads and wraps the model."""
    base_model().save_pretrained(tmp_path / "base")
    word_tokenizer().save_pretrained(tmp_path / "base")
    args = SFTConfig(str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8, learning_rate=5e-2,
                     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    config = hf_speft.SparsePeftConfig(target_modules=TARGETS, match_lora_rank=2, salience="gradient",
                                       salience_batches=2)
    trainer = hf_speft.SpeftSFTTrainer(model=str(tmp_path / "base"), args=args, train_dataset=counting_prompts(),
                                       peft_config=config)
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"] is config
    trainer.train()
    layers = sparse_layers(trainer.model)
    assert layers and all(layer.speft_values["default"].numel() > 0 for layer in layers.values())
    trainer.save_model()
    trainer.create_model_card()  # trl's card (chat example, "fine-tuned version of <local path>") becomes ours
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## SPEFT adapter" in card and str(tmp_path) not in card and "fine-tuned version of" not in card
    assert "licence" not in card and "- steps: 3" in card


def test_speft_trainer_takes_a_plain_model_or_path_and_peft_config(tmp_path):
    from trainer_helpers import counting_dataset, training_args
    from transformers import default_data_collator

    base_model().save_pretrained(tmp_path / "base")
    config = dict(target_modules=TARGETS, density=0.05, salience="gradient", salience_batches=2)
    for model in (base_model(), str(tmp_path / "base")):
        trainer = hf_speft.SpeftTrainer(model=model, args=training_args(tmp_path / "out", max_steps=2),
                                        train_dataset=counting_dataset(), data_collator=default_data_collator,
                                        peft_config=hf_speft.SparsePeftConfig(**config))
        assert isinstance(trainer.model, PeftModel)
        trainer.train()
        assert sum(layer.speft_values["default"].numel() for layer in sparse_layers(trainer.model).values()) > 0
    from peft import LoraConfig

    with pytest.raises(TypeError, match="trains SPEFT adapters; got peft_config of type LoraConfig"):
        hf_speft.SpeftTrainer(model=base_model(), args=training_args(tmp_path / "out"), peft_config=LoraConfig())


QUICK_STARTS = [Path(__file__).parents[1] / "README.md", Path(__file__).parents[1] / "docs" / "training.md"]


@pytest.mark.parametrize("path", QUICK_STARTS, ids=lambda path: path.name)
def test_the_quick_start_trains_as_written_on_a_cpu(path, tmp_path, monkeypatch):
    """The trainer examples run unchanged on a machine without a GPU (forced here), a tiny local model standing in
    for the Hub ids they name, and save a loadable adapter."""
    base_model().save_pretrained(tmp_path / "tiny")
    word_tokenizer().save_pretrained(tmp_path / "tiny")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    tiny = repr(str(tmp_path / "tiny"))
    blocks = doc_examples(path, "SpeftSFTTrainer(", substitutions={'"HuggingFaceTB/SmolLM2-135M-Instruct"': tiny,
                                                                    '"org/model-or-path"': tiny})
    assert len(blocks) == 1
    namespace = run_doc_example(blocks[0], path, {
        "prompt_completion_data": counting_prompts(16), "base": base_model(), "train": counting_dataset(),
        "collator": default_data_collator})
    trainer = namespace["trainer"]
    causal_default = DEFAULT_SALIENCE["CAUSAL_LM"]  # an SFT quick start sets task_type, so it gets this measure
    chosen = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "quality_lm.json").read_text())[
        "chosen_learning_rates"]
    assert trainer.state.global_step > 0 and trainer.args.learning_rate == chosen[f"speft-{causal_default}"]
    assert trainer.model.peft_config["default"].salience == causal_default
    assert isinstance(trainer.model, PeftModel)
    if (tmp_path / "out" / "adapter").exists():
        PeftModel.from_pretrained(base_model(), tmp_path / "out" / "adapter")
