"""The coalesced Triton kernels of `hf_speft.kernels.triton`, called directly: exact against a float64 dense reference
in fp32/bf16/fp16 at shapes that cross every block boundary (rows > BLOCK_R, entries per row > BLOCK_E, tokens >
BLOCK_T), launch grids within CUDA's limits at any token count, and no host synchronisation in a call.

Without a CUDA device the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1): shapes stay
tiny. The grid tests need no kernel launch."""

from __future__ import annotations

import pytest
import torch

from hf_speft.kernels import choice
from hf_speft.kernels.pattern import SparsePattern

if not choice.triton_interpreted() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")
from hf_speft.kernels import triton as kernels  # noqa: E402 - after the interpreter check

DEVICE = "cuda" if torch.cuda.is_available() and not choice.triton_interpreted() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_GRID_Y_Z = 65_535


def problem(dtype: torch.dtype, out_features=37, in_features=45, tokens=131, seed=0):
    """A mask with a row of more than BLOCK_E entries, a column of more than BLOCK_E entries, empty rows/columns
    and random entries; 37 rows = 3 row blocks of 16; 131 tokens = 2 token blocks (one partial)."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.rand(out_features, in_features, generator=generator) < 0.15
    dense[5, :] = True  # 45 > BLOCK_E entries in one row
    dense[:, 7] = True  # 37 > BLOCK_E entries in one column (a row of Δᵀ)
    dense[11, :] = False
    dense[:, 20] = False
    indices = dense.reshape(-1).nonzero().squeeze(1)
    pattern = SparsePattern(indices.to(DEVICE), out_features, in_features)
    x = torch.randn(tokens, in_features, generator=generator).to(DEVICE, dtype)
    grad = torch.randn(tokens, out_features, generator=generator).to(DEVICE, dtype)
    base = torch.randn(tokens, out_features, generator=generator).to(DEVICE, dtype)
    values = torch.randn(indices.numel(), generator=generator).to(DEVICE)
    return pattern, x, grad, base, values


def reference(pattern, x, grad, base, values):
    out_features, in_features = pattern.shape
    delta = torch.zeros(out_features * in_features, dtype=torch.float64, device=x.device)
    delta[pattern.indices] = values.double()
    delta = delta.view(out_features, in_features)
    x64, g64 = x.double(), grad.double()
    return base.double() + x64 @ delta.t(), g64 @ delta, (g64.t() @ x64).reshape(-1)[pattern.indices]


def assert_close(found, expected, dtype, reduction):
    """Rounding of the result in `dtype` plus float32 accumulation error growing with √(reduction)."""
    scale = expected.abs().max().item()
    bound = torch.finfo(dtype).eps * scale + 4 * torch.finfo(torch.float32).eps * reduction ** 0.5 * scale
    assert (found.double() - expected).abs().max().item() <= bound


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_kernels_match_the_float64_reference(dtype_name):
    dtype = DTYPES[dtype_name]
    pattern, x, grad, base, values = problem(dtype)
    layout = pattern.layout
    forward = kernels.forward(base, x, values, layout)
    grad_t = kernels.prepare(grad)
    input_grad = kernels.input_grad(grad_t, values, layout, dtype)
    values_grad = kernels.values_grad(grad_t, x, layout, torch.float32)
    assert (forward.dtype, input_grad.dtype, values_grad.dtype) == (dtype, dtype, torch.float32)
    expected = reference(pattern, x, grad, base, values)
    assert_close(forward, expected[0], dtype, pattern.shape[1])
    assert_close(input_grad, expected[1], dtype, pattern.shape[0])
    assert_close(values_grad, expected[2], torch.float32, x.shape[0])


@pytest.mark.parametrize("chunk", [16, 64])
def test_values_gradient_over_several_token_chunks(chunk, monkeypatch):
    """Smaller chunks give several programs per row (16: capped at MAX_CHUNKS, some chunks empty; 64: a partial last
    chunk); their partial sums add up to the reference."""
    monkeypatch.setattr(kernels, "CHUNK_T", chunk)
    monkeypatch.setattr(kernels, "MAX_BLOCK_T", 16)
    pattern, x, grad, base, values = problem(torch.bfloat16, out_features=12, in_features=21, tokens=300)
    chunks, chunk_tokens = kernels.token_chunks(300)
    assert chunks == min(kernels.MAX_CHUNKS, -(-300 // chunk)) > 1 and chunks * chunk_tokens >= 300
    found = kernels.values_grad(kernels.prepare(grad), x, pattern.layout, torch.float32)
    assert_close(found, reference(pattern, x, grad, base, values)[2], torch.float32, 300)


def test_results_are_bitwise_deterministic():
    pattern, x, grad, base, values = problem(torch.bfloat16, tokens=40)
    layout = pattern.layout
    runs = [(kernels.forward(base, x, values, layout), kernels.values_grad(kernels.prepare(grad), x, layout,
                                                                          torch.float32)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_kernels_read_a_contiguous_transposed_operand():
    """Coalescing rests on this: the dense operand walks tokens at unit stride, whatever x's strides are."""
    pattern, x, grad, base, values = problem(torch.bfloat16, tokens=24)
    strided = x.t().contiguous().t()  # column-major (T, in)
    out = torch.empty_like(base)
    _, arguments, _ = kernels.spmm_launch(out, kernels.transposed(strided), values, pattern.crow, pattern.col, None,
                                          base)
    at = arguments[2]
    assert at.shape == (pattern.shape[1], 24) and at.stride() == (24, 1)
    assert torch.equal(kernels.forward(base, strided, values, pattern.layout),
                       kernels.forward(base, x, values, pattern.layout))


@pytest.mark.parametrize("rows", [1, 1024, 4096, 14336, 128256])
def test_launch_grids_fit_cuda_limits_at_8m_tokens(rows):
    """One-dimensional grids (limit 2**31 - 1; y and z stay 1 ≤ 65,535) covering every (row block, token block)."""
    tokens = 8 * 2**20
    spmm = kernels.grid(rows, tokens)
    assert len(spmm) == 1 and spmm[0] <= kernels.MAX_GRID
    assert spmm[0] == -(-rows // kernels.BLOCK_R) * -(-tokens // kernels.token_block(tokens))
    assert tokens // kernels.token_block(tokens) > CUDA_GRID_Y_Z  # a 2-D grid with tokens in y would not fit
    sddmm = kernels.sddmm_grid(rows, tokens)
    assert len(sddmm) == 1 and sddmm[0] == rows * kernels.MAX_CHUNKS <= kernels.MAX_GRID


def test_a_grid_beyond_cuda_limits_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match=r"4096 rows × 68719476736 tokens needs \d+ programs"):
        kernels.grid(4096, 2**36)


def test_steady_state_calls_make_no_host_synchronisation(monkeypatch):
    """The Python around the launches reads no tensor's value: every way a value reaches the host raises during the
    four calls of a training step (the launches themselves are recorded instead of run, since the interpreter reads
    tensors on the host; on a GPU they are asynchronous)."""
    pattern, x, grad, base, values = problem(torch.bfloat16, tokens=20)
    layout = pattern.layout
    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, launch_grid):
            return lambda *arguments, **constexprs: launched.append((self.name, launch_grid))

    monkeypatch.setattr(kernels, "_spmm_kernel", Recorder("spmm"))
    monkeypatch.setattr(kernels, "_sddmm_kernel", Recorder("sddmm"))

    def host_sync(*args, **kwargs):
        raise AssertionError("a host synchronisation in a steady-state call")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    monkeypatch.setattr(torch.cuda, "synchronize", host_sync)
    grad_t = kernels.prepare(grad)
    kernels.forward(base, x, values, layout)
    kernels.input_grad(grad_t, values, layout, torch.bfloat16)
    kernels.values_grad(grad_t, x, layout, torch.float32)
    assert launched == [("spmm", kernels.grid(37, 20)), ("spmm", kernels.grid(45, 20)),
                        ("sddmm", kernels.sddmm_grid(37, 20))]
