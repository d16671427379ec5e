"""DeepSpeed ZeRO-3 on 2 CPU processes (torchrun, gloo): calibrate on partitioned weights, train, save, reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_helpers import torchrun_two_processes
from safetensors.torch import load_file

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(autouse=True)
def one_kernel_everywhere(monkeypatch):
    """The workers' logits are compared with this process's: both run one kernel strategy (the automatic choice is
    timed per process and bucket, and strategies round bf16 differently)."""
    monkeypatch.setenv("HF_SPEFT_KERNEL", "csr")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from trainer_helpers import base_model

    path = tmp_path_factory.mktemp("tiny_llama")
    base_model().save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("measure", "dtype"), [("magnitude", "bfloat16"), ("gradient", "float32")])
def test_zero3_calibrate_train_and_save_a_full_adapter(tmp_path, model_dir, measure, dtype):
    """The adapter saved under ZeRO-3 has every value (not the empty tensors of peft#2892), reloads on a plain model
    and gives the engine's outputs; both ranks trained the same mask, the one a single process selects from all the
    salience batches on the unpartitioned model; the values keep the base dtype."""
    from ddp_worker import salience_batches
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from zero3_worker import PROBE, speft_config

    from hf_speft import calibrate, sparse_layers

    torchrun_two_processes(WORKERS / "zero3_worker.py", [str(tmp_path), str(model_dir), measure, dtype], timeout=900)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2] and all(rank["partitioned"] for rank in ranks)
    assert ranks[0]["values_dtypes"] == {f"torch.{dtype}"}  # the base dtype: ZeRO-3 gathers need one dtype
    assert ranks[0]["checkpointing_kwargs"]["use_reentrant"] is True
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3

    config = speft_config(measure)
    config.salience_batches = len(salience_batches())  # all the batches the two ranks shared
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)), config)
    calibrate(reference, salience_batches(), show_progress=False)
    expected = {name: layer.speft_indices["default"] for name, layer in sparse_layers(reference).items()}
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name, indices in expected.items():
        assert torch.equal(ranks[0]["masks"][name], indices) and torch.equal(ranks[1]["masks"][name], indices), name
        assert saved[f"{name}.speft_values"].numel() == indices.numel(), name
    assert sum(value.numel() for key, value in saved.items() if key.endswith("speft_values")) == sum(
        indices.numel() for indices in expected.values()) > 0

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        base_logits = base(input_ids=PROBE).logits.float()
        loaded = PeftModel.from_pretrained(base, tmp_path, autocast_adapter_dtype=False).eval()
        for layer in sparse_layers(loaded).values():  # the engine ran unfolded (a partitioned base cannot fold)
            layer.speft_fold_weights["default"] = False
        logits = loaded(input_ids=PROBE).logits.float()
    torch.testing.assert_close(logits, ranks[0]["logits"].float())
    torch.testing.assert_close(ranks[1]["logits"], ranks[0]["logits"])
    assert not torch.allclose(logits, base_logits, atol=1e-2)  # training through checkpointed blocks changed it
