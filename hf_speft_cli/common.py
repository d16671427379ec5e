"""What the `hf-speft` commands share: the one-line user error and writing an output folder atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from ..hub import read_adapter_folder

class CliError(Exception):
    """A user error: printed as one line, exit code 2."""



@contextlib.contextmanager
def staged_folder(out_dir: str) -> Iterator[str]:
    """A temporary folder beside `out_dir` to write into; its files move into `out_dir` only if the block succeeds,
    so a failed command leaves `out_dir` as it was (absent, or with its old files)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", dir=parent)
    try:
        yield staging
        if not os.path.exists(out_dir):
            os.replace(staging, out_dir)
            return
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def speft_deltas(adapter_dir: str, instead: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, module name -> validated `checkpoint.ModuleDelta`) of an adapter folder whose tensors are all SPEFT
    tensors; `instead` says what to do with one holding others (e.g. modules_to_save)."""
    folder = read_adapter_folder(adapter_dir)
    other = sorted(key for key in folder.tensors if ".speft_" not in key)
    if other:
        raise CliError(f"{adapter_dir!r} also holds non-SPEFT tensors ({other[:3]}, e.g. modules_to_save); {instead}.")
    return folder.config, folder.deltas
