"""A tiny BERT classifier with its own word-level tokenizer, and SST-2-format data it can learn (tests only)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "the", "was", "a"]


def write_sst2(folder: Path, size: int = 32) -> Path:
    """train.tsv and dev.tsv ("the movie was <word>", label 1 for the first three words) in `folder`."""
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


def build_tiny_encoder(folder: Path) -> Path:
    """Save a 2-layer BERT sequence classifier and its tokenizer to `folder`."""
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
