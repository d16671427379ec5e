"""trl: `SpeftSFTTrainer` trains a SPEFT adapter on prompt-completion data with completion-only loss."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from trainer_helpers import base_model, speft_model
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig

import hf_speft
from hf_speft import sparse_layers

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
