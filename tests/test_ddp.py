"""DDP on 2 CPU processes (torchrun, gloo): every rank ends with the same masks and values."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(out_dir, mode: str) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    result = subprocess.run([*torchrun, str(TESTS / "ddp_worker.py"), str(out_dir), mode], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


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
