"""Which strategy computes a product: the one asked for, or — for `"auto"` — the fastest one measured.

The automatic choice is made per product (forward, input_grad, values_grad) and bucket: device, dtype, the (out, in)
shape, and nnz and the token count each rounded up to a power of two. The first call in a bucket validates and times
every eligible strategy on the real operands — the only moment a product's errors are caught and the device
synchronised: one that raises or disagrees with the reference strategy is dropped with a warning (never used for
that bucket), and the fastest of the rest is kept. A choice read from the disk cache is validated once per process
the same way before it is used. After that the chosen strategy runs alone, with no host synchronisation and no
fallback: if it raises, the error names it and `$HF_SPEFT_KERNEL` (after an asynchronous device fault the device is
unusable, so trying the next strategy could not help). Decisions live in memory and on disk (a JSON file under the
Hugging Face cache, `$HF_HOME/hf_speft/kernel_choices.json`, or `$HF_SPEFT_KERNEL_CACHE`; keyed by torch and Triton
versions, merged into the file's current content and written atomically; an unreadable file is ignored with a
warning), and each is logged once.

Each process decides on its own, with no collective call: inside an op a rank may meet a new bucket, a failure or a
whole forward (evaluation, generation) alone, and a collective there would wait forever for the others. Ranks that
chose differently compute the same products within rounding, and what must be identical across ranks — parameters,
masks, optimizer state — is derived from all-reduced gradients and scores, never from one rank's activations.

On the CPU `triton` is never chosen automatically (its interpreter is for testing); on CUDA `csr` is not chosen for
fp16/bf16, where it would copy x and g to float32.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from collections.abc import Callable

import torch

from . import KERNELS

logger = logging.getLogger(__name__)

ENV_KERNEL = "HF_SPEFT_KERNEL"
ENV_CACHE = "HF_SPEFT_KERNEL_CACHE"
REFERENCE_ORDER = ("dense", "csr", "triton")  # the first that runs is the reference the others must agree with
TIMED_RUNS = 3
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_choices: dict[str, str] = {}  # bucket -> strategy, this process
_failures: dict[tuple[str, str], str] = {}  # (bucket, strategy) -> why it was dropped
_disk: dict[str, str] | None = None


def check_kernel(name: object, source: str = "kernel") -> None:
    if name not in KERNELS:
        raise ValueError(f"{source}={name!r} is not allowed; use one of {KERNELS}.")


def requested(kernel: str) -> str:
    """The kernel a call uses: `$HF_SPEFT_KERNEL` if set (it overrides any config, for benchmarking), else
    `kernel`; explicit strategies are checked to be runnable here before any work."""
    override = os.environ.get(ENV_KERNEL)
    if override:
        check_kernel(override, ENV_KERNEL)
        kernel = override
    check_kernel(kernel)
    return kernel


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def check_available(name: str, device: torch.device) -> None:
    """A one-line error if the explicitly requested strategy cannot run on `device`."""
    if name != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ImportError("kernel='triton' needs Triton, which is not installed; install it with "
                          "`pip install 'hf-speft[triton]'` or use one of ('auto', 'csr', 'dense').")
    if device.type == "cpu" and not triton_interpreted():
        raise ValueError("kernel='triton' runs on GPU tensors (on the CPU only under TRITON_INTERPRET=1, for "
                         "testing); use 'auto', 'csr' or 'dense' on the CPU.")


def strategy(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def eligible(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = ["dense", "csr"]
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        names.remove("csr")  # it would copy x and g to float32
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return names


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _power_of_two_at_least(count: int) -> int:
    return 1 << max(count - 1, 0).bit_length()


def bucket(product: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int], nnz: int,
           tokens: int) -> str:
    """The description of a decision's bucket, as `kernel_choices()` reports it. nnz and tokens are rounded up to a
    power of two: a global budget gives every layer its own nnz, and variable-length batches their own token
    counts, so exact values would measure almost every layer at almost every step; which strategy wins moves with
    density and size, not with their last digits."""
    return (f"{product} {_device_name(device)} {str(dtype).removeprefix('torch.')} {shape[0]}x{shape[1]} "
            f"nnz<={_power_of_two_at_least(nnz)} tokens<={_power_of_two_at_least(tokens)}")


def kernel_choices() -> dict[str, str]:
    """The automatic decisions made (or read from the disk cache) in this process: bucket -> strategy."""
    return dict(_choices)


def clear_memory() -> None:
    """Forget this process's decisions and recorded failures (the disk cache stays)."""
    global _disk
    _choices.clear()
    _failures.clear()
    _disk = None


def cache_path() -> Path:
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit)
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_speft" / "kernel_choices.json"


def _versions() -> str:
    triton = "none"
    if importlib.util.find_spec("triton") is not None:
        from importlib.metadata import version

        triton = version("triton")
    return f"torch {torch.__version__}, triton {triton}"


def _load(path: Path) -> dict[str, str]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError("not a JSON object of strategy names")
    return data


def _read_disk() -> dict[str, str]:
    global _disk
    if _disk is None:
        _disk = {}
        path = cache_path()
        if path.exists():
            try:
                _disk = _load(path)
            except (OSError, ValueError) as error:
                warnings.warn(f"Ignoring the unreadable kernel-choice cache {path} ({error}); it will be rewritten.",
                              stacklevel=4)
    return _disk


def _write_disk(key: str, name: str) -> None:
    """Merge one decision into the cache file's current content (other processes write it too): a temporary file in
    the same folder replaces it atomically."""
    known = _read_disk()
    known[key] = name
    path = cache_path()
    try:
        written_since = _load(path)
    except (OSError, ValueError):
        written_since = {}
    entries = {**known, **written_since, key: name}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".kernel_choices.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle, indent=1, sort_keys=True)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:  # a read-only cache costs a re-measurement next time, nothing else
        logger.warning("Could not write the kernel-choice cache %s: %s", path, error)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _drop(key: str, name: str, error: BaseException | str) -> None:
    why = error if isinstance(error, str) else _describe(error)
    _failures[(key, name)] = why
    warnings.warn(f"hf_speft: the {name!r} kernel is skipped for {key}: {why}", stacklevel=5)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _device_fault(error: BaseException) -> bool:
    """An error the device cannot recover from (CUDA's sticky faults): no other strategy can run after it."""
    return isinstance(error, getattr(torch, "AcceleratorError", ()))


def _fault_error(key: str, name: str, error: BaseException) -> RuntimeError:
    return RuntimeError(f"hf_speft: the {name!r} kernel caused a device fault for {key} ({_describe(error)}); the "
                        f"device cannot run anything else in this process. Force another strategy with "
                        f"${ENV_KERNEL} (one of {KERNELS[1:]}) or the config's kernel field.")


def _validated_run(key: str, name: str, run: Callable[[str], torch.Tensor], device: torch.device):
    """`run(name)`, synchronised; None (and the strategy dropped for the bucket) if it raised."""
    try:
        result = run(name)  # the first run also compiles (Triton) and warms caches
        _synchronize(device)
        return result
    except Exception as error:  # noqa: BLE001 - a strategy that fails while measured only leaves the choice
        if _device_fault(error):
            raise _fault_error(key, name, error) from error
        _drop(key, name, error)
        return None


def _measure(key: str, names: list[str], run: Callable[[str], torch.Tensor], device: torch.device,
             dtype: torch.dtype) -> tuple[str, dict[str, float]]:
    """Run each strategy on the real operands: drop those that fail or disagree with the reference, time the rest."""
    outputs, times = {}, {}
    for name in sorted(names, key=REFERENCE_ORDER.index):
        result = _validated_run(key, name, run, device)
        if result is None:
            continue
        if outputs:
            reference_name, reference = next(iter(outputs.items()))
            scale = reference.abs().max().item() or 1.0
            error = (result.to(reference.dtype) - reference).abs().max().item() / scale
            if not error <= _TOLERANCE.get(dtype, 1e-3):
                _drop(key, name, f"its result differs from {reference_name!r}'s by {error:.2e} (relative)")
                continue
        outputs[name] = result
        runs = []
        for _ in range(TIMED_RUNS):
            start = time.perf_counter()
            run(name)
            _synchronize(device)
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    if not times:
        raise RuntimeError(f"No kernel strategy ran for {key}: " +
                           "; ".join(f"{name}: {_failures.get((key, name))}" for name in names))
    return min(times, key=times.get), times


def choose(product: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int], nnz: int, tokens: int,
           run: Callable[[str], torch.Tensor]) -> str:
    """The strategy for `product` in this bucket: remembered (a dictionary look-up: the steady state), or read from
    disk and validated, or measured now with `run(name)` (the product on the real operands). Never a collective."""
    key = bucket(product, device, dtype, shape, nnz, tokens)
    name = _choices.get(key)
    if name is not None:
        return name
    candidates = [n for n in eligible(device, dtype) if (key, n) not in _failures]
    disk_key = f"{key} [{_versions()}]"
    name, source, times = _read_disk().get(disk_key), "the disk cache", {}
    if name not in candidates or _validated_run(key, name, run, device) is None:
        candidates = [n for n in candidates if (key, n) not in _failures]
        name, times = _measure(key, candidates, run, device, dtype)
        source = "measurement"
        _write_disk(disk_key, name)
    _choices[key] = name
    measured = ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in times.items())
    logger.info("hf_speft kernel for %s: %s (from %s%s)", key, name, source, f": {measured}" if measured else "")
    return name


def steady_state_error(product_key_args: tuple, name: str, error: BaseException) -> RuntimeError:
    """The error for the chosen `name` raising after its bucket's measurement: no fallback (the failure may come from
    the device, which no other strategy can then use), but a message saying how to force another strategy."""
    others = [n for n in KERNELS[1:] if n != name]
    return RuntimeError(f"hf_speft: the automatically chosen {name!r} kernel failed for "
                        f"{bucket(*product_key_args)}: {_describe(error)}. Set ${ENV_KERNEL} (or the config's kernel "
                        f"field) to one of {others} to use another strategy.")
