"""recipes/glue.py: GLUE metrics against hand-computed values, data errors, and the recipe end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

RECIPE = Path(__file__).parents[1] / "recipes" / "glue.py"
spec = importlib.util.spec_from_file_location("glue_recipe", RECIPE)
glue = sys.modules["glue_recipe"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(glue)

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "the", "was", "a"]


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


def write_sst2(folder: Path, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "dev"):
        lines = ["sentence\tlabel"]
        for _ in range(size):
            label = int(torch.randint(0, 2, (1,), generator=generator))
            word = WORDS[int(torch.randint(0, 3, (1,), generator=generator)) + (0 if label else 3)]
            lines.append(f"the movie was {word}\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{word: 4 + i for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(folder)
    return folder


def glue_args(model_dir, data_dir, output_dir, method, *extra):
    return ["--model_name_or_path", str(model_dir), "--task", "sst2", "--dataset_path", str(data_dir), "--method",
            method, "--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-2", "--lora_r", "2", "--salience_batches", "2", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "True", *extra]


@pytest.mark.parametrize("method", ["speft", "lora", "full"])
def test_glue_recipe_end_to_end(tmp_path, tiny_encoder_dir, method):
    data = write_sst2(tmp_path / "sst2")
    glue.main(glue_args(tiny_encoder_dir, data, tmp_path / "out", method))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["task"] == "sst2" and saved["method"] == method and saved["num_eval"] == 32
    assert 0 <= saved["metrics"]["accuracy"] <= 1 and saved["trainable_params"] > 0


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
