"""pytest set-up (the shared models, inputs and config cases are in `testing_common`).

Set before anything imports Triton: without a CUDA device, Triton's interpreter runs the `triton` kernels on CPU
tensors (tests/test_kernels.py); with one, they compile for it. The kernel-choice cache of every test (and of the
processes tests start) is a temporary file, never the user's Hugging Face cache."""

from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def kernel_choice_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("kernel_cache") / "kernel_choices.json")
    os.environ["HF_SPEFT_KERNEL_CACHE"] = path
    return path



@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory):
    """A saved tiny Llama whose 4-bit layers bitsandbytes can pack (in_features >= its 64-weight block, out % 32 == 0):
    the quantized-base tests' model (test_bnb.py, test_bnb_merge.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide_base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    return folder
