"""Every kernel strategy against a dense float64 reference (the automatic choice: tests/test_kernel_choice.py).

Each test forces the strategy it checks, so nothing depends on which one wins on this machine. Without a CUDA device
the `triton` strategy runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1 before Triton is
imported); the `cuda` variants run where a GPU is (`pytest -m cuda`)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import hf_speft.kernels.pattern as pattern_module
from hf_speft import SparsePeftConfig
from hf_speft.kernels import choice, dense
from hf_speft.ops import KERNELS, SparsePattern, sparse_delta, sparse_values_grad

STRATEGIES = ["csr", "dense", "triton"]
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device on this machine")])]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def runnable(strategy: str, device: str) -> None:
    if strategy == "triton" and device == "cpu" and not choice.triton_interpreted():
        pytest.skip("Triton's interpreter is off (a CUDA device is present): the cuda variant tests triton")


@pytest.fixture(autouse=True)
def fresh_choices(tmp_path, monkeypatch):
    """Each test starts with no decision in memory and its own empty disk cache."""
    monkeypatch.setenv(choice.ENV_CACHE, str(tmp_path / "kernel_choices.json"))
    monkeypatch.delenv(choice.ENV_KERNEL, raising=False)
    choice.clear_memory()
    yield
    choice.clear_memory()


def make_problem(out_features=13, in_features=11, nnz=30, tokens=(2, 6), dtype=torch.float32, device="cpu",
                 indices=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if indices is None:
        indices = torch.randperm(out_features * in_features, generator=generator)[:nnz].sort().values
    values_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(*tokens, in_features, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    values = torch.randn(indices.numel(), generator=generator, dtype=values_dtype).to(device).requires_grad_()
    base = torch.randn(*tokens, out_features, generator=generator).to(device=device, dtype=dtype)
    grad = torch.randn(*tokens, out_features, generator=generator).to(device=device, dtype=dtype)
    return SparsePattern(indices.to(device), out_features, in_features), x, values, base, grad


def reference(pattern, x, values, base, grad):
    """(out, grad x, grad values) of base + x·Δᵀ in float64 from the same (rounded) inputs."""
    out_features, in_features = pattern.shape
    delta = torch.zeros(out_features * in_features, dtype=torch.float64, device=x.device)
    delta[pattern.indices.long()] = values.detach().double()
    delta = delta.view(out_features, in_features)
    x64, g64 = x.detach().double().reshape(-1, in_features), grad.double().reshape(-1, out_features)
    out = base.double().reshape(-1, out_features) + x64 @ delta.t()
    grad_values = (g64.t() @ x64).reshape(-1)[pattern.indices.long()]
    return out.reshape(base.shape), (g64 @ delta).reshape(x.shape), grad_values


def call_args(problem):
    pattern, x, values, base, _ = problem
    return base, x, values, pattern


def run(pattern, x, values, base, grad, kernel):
    out = sparse_delta(base, x, values, pattern, kernel=kernel)
    return (out, *torch.autograd.grad(out, (x, values), grad))


def assert_matches(found, expected, dtype, reduction: int, what: str):
    """Error bound: rounding of the operands' products and of the result in `dtype`, growing with √(reduction)."""
    eps = torch.finfo(dtype).eps
    scale = expected.abs().max().item() or 1.0
    error = (found.double() - expected).abs().max().item()
    assert error <= 2 * eps * (2 + reduction ** 0.5) * scale, f"{what}: error {error:.3e} at scale {scale:.3e}"


CASES = {
    "random": {},
    "empty rows and columns": {"out_features": 9, "in_features": 8, "indices": torch.tensor([8 + 2, 8 + 5, 40 + 2])},
    "a full row": {"out_features": 6, "in_features": 40, "indices": torch.cat([torch.tensor([3]),
                                                                                  torch.arange(80, 120),
                                                                                  torch.tensor([200])])},
    "nnz=1": {"indices": torch.tensor([57])},
    "tokens not a block multiple": {"tokens": (67,), "nnz": 20},
}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("device", DEVICES)
def test_strategy_matches_the_dense_reference(device, strategy, case, dtype_name):
    runnable(strategy, device)
    dtype = DTYPES[dtype_name]
    problem = make_problem(dtype=dtype, device=device, **CASES[case])
    pattern, x, values, base, grad = problem
    out, grad_x, grad_values = run(*problem, kernel=strategy)
    assert out.dtype == dtype and grad_x.dtype == dtype and grad_values.dtype == torch.float32
    expected = reference(*problem)
    out_features, in_features = pattern.shape
    assert_matches(out, expected[0], dtype, in_features, "forward")
    assert_matches(grad_x, expected[1], dtype, out_features, "input gradient")
    assert_matches(grad_values, expected[2], dtype, x.numel() // in_features, "values' gradient")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float64_gradcheck(strategy):
    runnable(strategy, "cpu")
    pattern, x, values, base, _ = make_problem(7, 5, 9, tokens=(3, 2), dtype=torch.float64)
    base = base.requires_grad_()
    assert torch.autograd.gradcheck(lambda b, xx, v: sparse_delta(b, xx, v, pattern, kernel=strategy),
                                    (base, x, values))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_three_dimensional_non_contiguous_inputs(strategy):
    runnable(strategy, "cpu")
    pattern, x, values, base, grad = make_problem(tokens=(3, 4))
    x_t = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (3, 4, in), strided
    base_t = base.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_t.is_contiguous() and not base_t.is_contiguous()
    found = run(pattern, x_t, values, base_t, grad, kernel=strategy)
    for got, expected in zip(found, reference(pattern, x_t, values, base_t, grad)):
        assert_matches(got, expected, torch.float32, 11, "non-contiguous")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_int64_index_path(strategy, monkeypatch):
    """Weights of 2**31 entries or more get int64 layouts; forced here on a small weight."""
    runnable(strategy, "cpu")
    monkeypatch.setattr(pattern_module, "index_dtype_for", lambda numel: torch.int64)
    problem = make_problem()
    assert all(tensor.dtype == torch.int64 for tensor in problem[0].layout[1:6])
    for got, expected in zip(run(*problem, kernel=strategy), reference(*problem)):
        assert_matches(got, expected, torch.float32, 12, "int64 layout")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_values_gradient_alone(strategy):
    """The values' gradient of a delta already inside the product (fold, transient merge): the SDDMM alone."""
    runnable(strategy, "cpu")
    pattern, x, values, base, grad = make_problem()
    grad_values = sparse_values_grad(grad, x.detach(), values.detach(), pattern, kernel=strategy)
    assert_matches(grad_values, reference(pattern, x, values, base, grad)[2], torch.float32, 12, "folded")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_under_bf16_autocast(strategy):
    """Trainer(bf16=True) autocasts the base layer (bf16 output) around float32 inputs; the kernels run anyway."""
    runnable(strategy, "cpu")
    pattern, x, values, _, _ = make_problem()
    weight = torch.randn(13, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = torch.nn.functional.linear(x, weight)
        out = sparse_delta(base, x, values, pattern, kernel=strategy)
    assert base.dtype == out.dtype == torch.bfloat16
    grad = torch.randn(out.shape).to(out.dtype)
    grad_x, grad_values = torch.autograd.grad(out, (x, values), grad)
    assert grad_x.dtype == grad_values.dtype == torch.float32
    expected = reference(pattern, x, values, base.detach(), grad)
    assert_matches(out, expected[0], torch.bfloat16, 11, "forward")
    assert_matches(grad_values, expected[2], torch.bfloat16, 12, "values' gradient")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_same_result_twice(strategy):
    runnable(strategy, "cpu")
    problem = make_problem(tokens=(70,), dtype=torch.bfloat16)
    first, second = run(*problem, kernel=strategy), run(*problem, kernel=strategy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dense_values_gradient_holds_no_weight_sized_temporary(monkeypatch):
    """Chunked over rows: with blocks of 2 rows no intermediate of the folded backward reaches the weight's size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(dense, "CHUNK_ELEMENTS", 2 * 11)
    pattern, x, values, base, grad = make_problem(13, 11, 60, tokens=(3,))  # token tensors smaller than W
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in (result if isinstance(result, (tuple, list)) else [result])
                         if isinstance(t, torch.Tensor))
            return result

    with Sizes():
        grad_values = sparse_values_grad(grad, x.detach(), values.detach(), pattern, kernel="dense")
    assert 0 < max(sizes) < 13 * 11
    assert_matches(grad_values, reference(pattern, x, values, base, grad)[2], torch.float32, 12, "chunked")


class TinySparseModel(torch.nn.Module):
    def __init__(self, kernel: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.kernel = torch.nn.Linear(11, 13), kernel
        self.pattern = SparsePattern(torch.randperm(13 * 11)[:20].sort().values, 13, 11)
        self.values = torch.nn.Parameter(torch.randn(20))

    def forward(self, x):
        return torch.tanh(sparse_delta(self.linear(x), x, self.values, self.pattern, kernel=self.kernel)).sum()


def compiled_matches_eager(kernel: str, backend: str) -> None:
    model, x = TinySparseModel(kernel), torch.randn(2, 5, 11, requires_grad=True)
    grads = []
    for fn in (torch.compile(model, backend=backend, fullgraph=True), model):
        loss = fn(x)
        grads.append((loss.detach(), *torch.autograd.grad(loss, (x, model.values))))
    for compiled, eager in zip(*grads):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", "csr", "dense", "triton"])
def test_torch_compile_sees_the_custom_ops(kernel):
    runnable(kernel, "cpu")
    torch._dynamo.reset()
    compiled_matches_eager(kernel, "aot_eager")


def test_torch_compile_with_inductor():
    torch._dynamo.reset()
    compiled_matches_eager("dense", "inductor")


# ---------------------------------------------------------------------------------------------------- bad input
def test_an_unknown_kernel_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"^kernel='fast' is not allowed; use one of \('auto', 'csr', 'dense', "
                                         r"'triton'\)\.$"):
        sparse_delta(*call_args(make_problem()), kernel="fast")
    with pytest.raises(ValueError, match=r"kernel='fast' is not allowed"):
        SparsePeftConfig(target_modules=["q_proj"], kernel="fast")
    assert KERNELS == ("auto", "csr", "dense", "triton")


def test_triton_without_triton_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'hf-speft\[triton\]'"):
        sparse_delta(*call_args(make_problem()), kernel="triton")
    assert "triton" not in choice.eligible(torch.device("cuda"), torch.bfloat16)


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kernel='triton' runs on GPU tensors"):
        sparse_delta(*call_args(make_problem()), kernel="triton")


def test_the_kernel_field_is_saved_and_old_configs_load(tmp_path):
    SparsePeftConfig(target_modules=["q_proj"], kernel="dense").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["kernel"] == "dense"
    del saved["kernel"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SparsePeftConfig.from_pretrained(str(tmp_path)).kernel == "auto"
