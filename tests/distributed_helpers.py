"""Run a script on 2 CPU processes with torchrun (gloo), as the multi-process tests do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
WORKERS = TESTS / "workers"  # the scripts that subprocesses run; they import helpers from TESTS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_two_processes(script: Path, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 script *args`; fails the test with the stderr tail if a rank fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), *args]
    # the checkout's root first: the workers import this checkout's hf_speft, not an editable install elsewhere
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS),
                                                                                str(WORKERS)])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
