"""What the `hf-speft` commands share: the one-line user error, writing an output folder atomically, and the
library's names that `--help` shows.

Nothing here imports `hf_speft` at module level: importing any `hf_speft` module runs `hf_speft/__init__`, which loads
torch, transformers and peft to register the method, and `--help` must not wait for that.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


ADAPTER_DIR_HELP = "a saved SPEFT adapter folder (adapter_config.json + adapter_model.safetensors)"


def _library_file(module: str) -> Path:
    """The source of `hf_speft/<module>.py`, found without importing (so without running) the `hf_speft` package."""
    spec = importlib.util.find_spec("hf_speft")
    return Path(next(iter(spec.submodule_search_locations))) / f"{module}.py"


def library_constant(module: str, name: str) -> Any:
    """The literal module-level constant `name` of `hf_speft/<module>.py`, read from its source: the one definition,
    shown by `--help` without importing torch."""
    for node in ast.parse(_library_file(module).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"hf_speft/{module}.py defines no literal {name}")


def builtin_measures() -> list[str]:
    """The built-in salience measures: `hf_speft/measures.py` (a dependency-free registry) run on its own, outside
    the package, so its `available_measures()` answers before any measure is registered by user code."""
    name = "hf_speft_cli._builtin_measures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _library_file("measures"))
        sys.modules[name] = importlib.util.module_from_spec(spec)  # before running it, as importlib does
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name].available_measures()


def check_local_or_hub(name: str, what: str) -> None:
    """Refuse `name` unless it is an existing path or a valid Hub repo id: a missing folder is named as such, not
    reported with the Hub's repo-id validation message."""
    if os.path.exists(name):
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CliError(f"The {what} folder {name!r} does not exist (and {name!r} is not a Hub repo id).") from None


def check_writable_output(out_dir: str, overwrite: bool) -> None:
    """Refuse an `out_dir` that is a file, or a non-empty folder unless `overwrite` (its files would be replaced)."""
    if os.path.isfile(out_dir):
        raise CliError(f"The output {out_dir!r} is a file; give a folder.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CliError(f"The output folder {out_dir!r} exists and is not empty; pass --overwrite to replace it, or "
                       "choose another folder.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(out_dir: str, replace: bool = False) -> Iterator[str]:
    """A temporary folder beside `out_dir` to write into, moved into place only if the block succeeds, so a failed
    command leaves `out_dir` as it was. An existing `out_dir` gets the staged files added (same names replaced), or
    with `replace` is replaced as a whole. A new folder gets the umask's mode, as `os.makedirs` (and so
    `save_pretrained`) gives it, not the 700 of a temporary folder."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        if replace and os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old.", dir=parent)
            os.replace(out_dir, os.path.join(old, "replaced"))
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        elif not os.path.exists(out_dir):
            os.replace(staging, out_dir)
        else:
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def speft_deltas(adapter_dir: str, instead: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, module name -> validated `checkpoint.ModuleDelta`) of an adapter folder whose tensors are all SPEFT
    tensors; `instead` says what to do with one holding others (e.g. modules_to_save)."""
    from hf_speft.hub import read_adapter_folder

    folder = read_adapter_folder(adapter_dir)
    other = sorted(key for key in folder.tensors if ".speft_" not in key)
    if other:
        raise CliError(f"{adapter_dir!r} also holds non-SPEFT tensors ({other[:3]}, e.g. modules_to_save); {instead}.")
    return folder.config, folder.deltas

