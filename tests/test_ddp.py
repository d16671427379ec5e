"""DDP and FSDP2 on 2 CPU processes (torchrun, gloo): every rank ends with the same masks and values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_helpers import torchrun_two_processes

WORKERS = Path(__file__).parent / "workers"


def run_two_processes(out_dir, mode: str) -> None:
    torchrun_two_processes(WORKERS / "ddp_worker.py", [str(out_dir), mode], timeout=300)


@pytest.mark.slow
def test_ddp_two_processes_agree_on_masks_and_values(tmp_path):
    run_two_processes(tmp_path, "train")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]  # really two processes
    assert all(rank["churn_logged"] for rank in ranks)  # dynamic updates ran
    first, second = (rank["state"] for rank in ranks)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name][0], second[name][0]), f"masks differ across ranks for {name}"
        assert torch.equal(first[name][1], second[name][1]), f"values differ across ranks for {name}"
    assert sum(values.abs().sum() for _, values in first.values()) > 0
    folded, unfolded = ranks[0]["static"]["auto"], ranks[0]["static"][False]
    for name, (indices, values) in unfolded.items():  # folding (the default) changes no gradient
        assert torch.equal(folded[name][0], indices), name
        torch.testing.assert_close(folded[name][1], values, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_two_process_salience_equals_one_process_over_the_same_samples(tmp_path):
    """Each rank scores half the batches; the averaged scores select the mask one process selects from all."""
    from ddp_worker import calibrated_masks, salience_batches

    run_two_processes(tmp_path, "salience")
    ranks = [torch.load(tmp_path / f"salience{rank}.pt") for rank in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    single = calibrated_masks(salience_batches())
    for name, indices in single.items():
        assert torch.equal(ranks[0]["masks"][name], indices), f"{name}: 2-process mask differs from 1-process mask"
        assert torch.equal(ranks[1]["masks"][name], indices)


@pytest.mark.slow
def test_fsdp2_calibrate_train_and_save_a_full_adapter(tmp_path):
    """Calibrate, shard with fully_shard, train 3 steps, gather: the adapter reloads on a plain model and gives the
    sharded model's outputs."""
    from peft import PeftModel
    from trainer_helpers import base_model

    from ddp_worker import salience_batches
    from hf_speft import summarize_adapter

    run_two_processes(tmp_path, "fsdp2")
    ranks = [torch.load(tmp_path / f"fsdp{rank}.pt") for rank in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    for name, indices in ranks[0]["masks"].items():
        assert torch.equal(ranks[1]["masks"][name], indices), f"masks differ across ranks for {name}"
    summary = summarize_adapter(tmp_path / "adapter")
    assert summary.nnz == sum(indices.numel() for indices in ranks[0]["masks"].values()) > 0  # not an empty file
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=salience_batches()[0]["input_ids"]).logits
        base_logits = base_model()(input_ids=salience_batches()[0]["input_ids"]).logits
    torch.testing.assert_close(logits, ranks[0]["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[1]["logits"], ranks[0]["logits"])
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # training moved the outputs
