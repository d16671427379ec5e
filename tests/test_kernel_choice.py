"""The automatic choice (`kernel="auto"`): measured and validated per bucket, cached in memory and on disk, no
fallback and no host synchronisation at steady state, no collective (2-process gloo runs where one rank meets a
failure or a new bucket alone), and a compiled SPEFT training step with `fullgraph=True`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from distributed_helpers import WORKERS, torchrun_two_processes
from test_kernels import assert_matches, fresh_choices, make_problem, reference, run  # noqa: F401 - autouse fixture

from hf_speft import SparsePeftConfig
from hf_speft.kernels import choice, csr, dense
from hf_speft.ops import kernel_choices


# ------------------------------------------------------------------------------------------- measuring and caching
def auto_step(tokens=(2, 6)):
    problem = make_problem(tokens=tokens)
    for got, expected in zip(run(*problem, kernel="auto"), reference(*problem)):
        assert_matches(got, expected, torch.float32, 12, "auto")
    return problem


def test_auto_picks_a_strategy_per_product_and_caches_it_in_memory_and_on_disk():
    auto_step()
    choices = kernel_choices()
    assert sorted(key.split()[0] for key in choices) == ["forward", "input_grad", "values_grad"]
    assert set(choices.values()) <= {"csr", "dense"}  # triton is never chosen automatically on the CPU
    assert all(key.endswith("13x11 nnz<=32 tokens<=16") for key in choices)
    on_disk = json.loads(choice.cache_path().read_text())
    assert {key.split(" [")[0]: name for key, name in on_disk.items()} == choices


def test_layers_whose_nnz_and_tokens_round_to_one_power_of_two_share_a_measurement(monkeypatch):
    """A global budget gives each layer its own nnz and variable-length batches their own token counts: within a
    power of two they share one decision, so a model measures each shape a few times, not every layer."""
    measured = []
    original = choice._measure
    monkeypatch.setattr(choice, "_measure", lambda key, *args: measured.append(key) or original(key, *args))
    for nnz, tokens in ((17, (2, 6)), (30, (3, 5)), (32, (16,))):  # nnz 17..32 and 9..16 tokens: one bucket
        problem = make_problem(nnz=nnz, tokens=tokens)
        for got, expected in zip(run(*problem, kernel="auto"), reference(*problem)):
            assert_matches(got, expected, torch.float32, 12, "auto")
    assert sorted(key.split()[0] for key in measured) == ["forward", "input_grad", "values_grad"]
    run(*make_problem(nnz=33), kernel="auto")  # the next power of two is another bucket
    assert len(measured) == 6 and all("nnz<=64" in key for key in measured[3:])


def test_the_disk_cache_is_reused_after_clearing_memory_and_in_a_fresh_process(monkeypatch):
    auto_step()
    key = next(k for k in kernel_choices() if k.startswith("forward"))
    disk = json.loads(choice.cache_path().read_text())
    other = {"dense": "csr", "csr": "dense"}[kernel_choices()[key]]
    disk = {k: (other if k.startswith(key) else v) for k, v in disk.items()}  # a choice no measurement made here
    choice.cache_path().write_text(json.dumps(disk))
    choice.clear_memory()
    monkeypatch.setattr(choice, "_measure", lambda *a: pytest.fail("measured although the disk cache had it"))
    auto_step()
    assert kernel_choices()[key] == other
    code = ("import torch; from hf_speft.kernels import choice; from hf_speft.ops import SparsePattern, "
            "sparse_delta, kernel_choices\n"
            "choice._measure = lambda *a: (_ for _ in ()).throw(AssertionError('measured'))\n"
            "g = torch.Generator().manual_seed(0)\n"
            "pattern = SparsePattern(torch.randperm(143, generator=g)[:30].sort().values, 13, 11)\n"
            "x = torch.randn(12, 11, requires_grad=True)\n"
            "sparse_delta(torch.zeros(12, 13), x, torch.randn(30, requires_grad=True), pattern).sum().backward()\n"
            "print(kernel_choices()[" + repr(key) + "])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, not an installed copy
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == other


def test_a_decision_is_merged_into_what_another_process_wrote_meanwhile():
    auto_step()
    written = json.loads(choice.cache_path().read_text())
    choice.cache_path().write_text(json.dumps({**written, "another process's bucket": "csr"}))
    auto_step(tokens=(40,))  # a new token bucket: three more decisions written
    on_disk = json.loads(choice.cache_path().read_text())
    assert on_disk["another process's bucket"] == "csr" and len(on_disk) == 3 + 1 + 3


def test_the_environment_variable_overrides_the_config(monkeypatch):
    from peft import get_peft_model
    from testing_common import tiny_llama

    calls = []
    original = dense.forward
    monkeypatch.setattr(dense, "forward", lambda *a: calls.append(1) or original(*a))
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=["q_proj"], salience="magnitude",
                                                          kernel="csr",
                                                              fold_weights=False))  # unfolded: the forward's product
    ids = torch.randint(0, 64, (1, 5))
    monkeypatch.setenv(choice.ENV_KERNEL, "dense")
    model(input_ids=ids)
    assert len(calls) == 2  # both q_proj layers ran the dense forward, not the configured csr
    monkeypatch.setenv(choice.ENV_KERNEL, "fastest")
    with pytest.raises(ValueError, match=r"HF_SPEFT_KERNEL='fastest' is not allowed; use one of \('auto', 'csr'"):
        model(input_ids=ids)


def test_a_failing_strategy_is_skipped_with_a_warning(monkeypatch):
    from hf_speft.kernels import csr

    monkeypatch.setattr(csr, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel for this")))
    monkeypatch.setattr(csr, "values_grad", lambda grad_t, x, layout, dtype: torch.zeros(layout.nnz, dtype=dtype))
    with pytest.warns(UserWarning) as record:
        auto_step()  # and the results are right
    messages = [str(w.message) for w in record]
    assert any("'csr' kernel is skipped for forward" in m and "no kernel for this" in m for m in messages)
    assert any("'csr' kernel is skipped for values_grad" in m and "differs from 'dense'" in m for m in messages)
    choices = kernel_choices()
    assert all(name == "dense" for key, name in choices.items() if not key.startswith("input_grad"))


def test_a_cached_choice_is_validated_once_and_dropped_if_it_fails(monkeypatch):
    """The disk cache's choice is run once (synchronised, errors caught) before it is used: one that fails there is
    dropped and the rest measured, as at a first measurement."""
    from hf_speft.kernels import csr

    auto_step()
    disk = {key: "csr" for key in json.loads(choice.cache_path().read_text())}
    choice.cache_path().write_text(json.dumps(disk))
    choice.clear_memory()
    monkeypatch.setattr(csr, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("broken here")))
    with pytest.warns(UserWarning, match="'csr' kernel is skipped for forward.*broken here"):
        auto_step()
    assert next(name for key, name in kernel_choices().items() if key.startswith("forward")) == "dense"


def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten():
    choice.cache_path().write_text("{not json")
    with pytest.warns(UserWarning, match="Ignoring the unreadable kernel-choice cache"):
        auto_step()
    assert len(json.loads(choice.cache_path().read_text())) == 3


def test_eligible_strategies():
    assert choice.eligible(torch.device("cpu"), torch.bfloat16) == ["dense", "csr"]
    assert "csr" not in choice.eligible(torch.device("cuda"), torch.bfloat16)  # it would copy x and g to float32
    assert "csr" in choice.eligible(torch.device("cuda"), torch.float32)
    assert "triton" in choice.eligible(torch.device("cuda"), torch.bfloat16)



# ------------------------------------------------------------------------------------------------- the steady state
def broken(*args, **kwargs):
    raise RuntimeError("broken after the choice")


@pytest.mark.parametrize("product", ["forward", "input_grad", "values_grad"])
def test_a_steady_state_failure_raises_naming_the_strategy_and_no_other_runs(monkeypatch, product):
    """Once chosen, a strategy that raises is not replaced by the next one (after an asynchronous device fault none
    could run): the error names it, its bucket and $HF_SPEFT_KERNEL."""
    problem = auto_step()
    name = next(n for key, n in kernel_choices().items() if key.startswith(product))
    other = {"dense": csr, "csr": dense}[name]
    monkeypatch.setattr(choice.strategy(name), product, broken)
    monkeypatch.setattr(other, product, lambda *a: pytest.fail("fell back to another strategy"))
    with pytest.raises(RuntimeError, match=rf"the automatically chosen '{name}' kernel failed for {product} .* "
                                           r"RuntimeError: broken after the choice\. Set \$HF_SPEFT_KERNEL") as error:
        run(*problem, kernel="auto")
    assert isinstance(error.value.__cause__, RuntimeError)
    assert kernel_choices()[next(k for k in kernel_choices() if k.startswith(product))] == name  # not dropped


def test_a_device_fault_while_measuring_stops_with_its_strategy_named(monkeypatch):
    """A sticky device fault (torch.AcceleratorError) is not an ordinary failure: no other strategy can run after it."""
    def fault(*args):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(dense, "forward", fault)
    monkeypatch.setattr(csr, "forward", lambda *a: pytest.fail("another strategy ran after a device fault"))
    with pytest.raises(RuntimeError, match=r"the 'dense' kernel caused a device fault for forward .*illegal memory "
                                           r"access.*HF_SPEFT_KERNEL"):
        auto_step()


class NoHostSync:
    """Fails on every way Python code reads a tensor's data on the host (each a device synchronisation on CUDA)."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")

    def __init__(self, monkeypatch):
        for method in self.METHODS:
            monkeypatch.setattr(torch.Tensor, method, self.refuse(method))

    @staticmethod
    def refuse(method):
        def refused(*args, **kwargs):
            raise AssertionError(f"Tensor.{method} called in a steady-state call")
        return refused


@pytest.mark.parametrize("kernel", ["auto", "dense", "csr"])
def test_the_steady_state_reads_nothing_on_the_host(monkeypatch, kernel):
    """After the first call of a bucket no strategy reads a tensor on the host (CUDA graphs cannot capture that),
    also the dense values' gradient in blocks of rows, whose entries per block are known only on the device."""
    monkeypatch.setattr(dense, "CHUNK_ELEMENTS", 2 * 11)
    problem = make_problem(tokens=(7,))
    expected = reference(*problem)
    run(*problem, kernel=kernel)  # measures (auto)
    with monkeypatch.context() as patched:
        NoHostSync(patched)
        found = run(*problem, kernel=kernel)
    for got, want in zip(found, expected):
        assert_matches(got, want, torch.float32, 12, kernel)
    with monkeypatch.context() as patched:  # the guard itself works
        NoHostSync(patched)
        with pytest.raises(AssertionError, match="Tensor.item called"):
            torch.ones(1).item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("kernel", ["auto", "dense", "triton"])
def test_a_cuda_graph_captures_a_steady_state_forward_and_backward(monkeypatch, kernel):
    """After a warm-up call (measurement, Triton compilation) a forward and backward is captured in a CUDA graph with
    synchronisation debugging set to error; a replay on new inputs gives their products."""
    if kernel == "triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(dense, "CHUNK_ELEMENTS", 64 * 128)  # the blocked values' gradient too
    problem = make_problem(256, 128, 2000, tokens=(64,), dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(*problem, kernel=kernel)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            captured = run(*problem, kernel=kernel)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fresh = make_problem(256, 128, 2000, tokens=(64,), dtype=torch.bfloat16, device="cuda", seed=1,
                         indices=problem[0].indices.cpu())
    with torch.no_grad():
        for static, new in zip(problem[1:], fresh[1:]):
            static.copy_(new)
    graph.replay()
    for got, want in zip(captured, reference(*problem)):
        assert_matches(got, want, torch.bfloat16, 256, kernel)


def test_a_compiled_speft_training_step_with_fullgraph_matches_eager():
    """A tiny Llama with a SPEFT adapter (fold_weights=False: the fold is a forward-time weight write, skipped under
    a trace anyway) compiles with fullgraph=True, forward and backward through AOTAutograd, with the automatic
    choice inside the opaque custom ops; loss and the values' gradients equal eager ones. `loss.backward()` stays
    outside the compiled function (a Dynamo graph break), as in any compiled training step."""
    from peft import get_peft_model
    from testing_common import tiny_llama

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=["q_proj", "down_proj"], salience="magnitude",
                                                          fold_weights=False))
    ids = torch.randint(0, 64, (2, 9))

    def loss_of(input_ids):
        return model(input_ids=input_ids, labels=input_ids).loss

    values = [p for name, p in model.named_parameters() if p.requires_grad]
    results = []
    for fn in (torch.compile(loss_of, backend="aot_eager", fullgraph=True), loss_of):
        loss = fn(ids)
        results.append((loss.detach(), *torch.autograd.grad(loss, values)))
    assert {key.split()[0] for key in kernel_choices()} == {"forward", "input_grad", "values_grad"}
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in results[0][1:])


# ------------------------------------------------------------------------------------- distributed: no collectives
def two_ranks(tmp_path, mode: str) -> list[dict]:
    """The gloo run must finish: a collective inside the choice would hang the rank left waiting (its 60 s process
    group timeout and this 240 s limit turn that into a failure)."""
    torchrun_two_processes(WORKERS / "kernel_choice_worker.py", [str(tmp_path), mode], timeout=240)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    return ranks


@pytest.mark.slow
def test_a_strategy_failing_on_one_rank_only_does_not_hang(tmp_path):
    """Rank 0 uses `csr` from its disk cache; on rank 1 `csr` raises, so rank 1 measures and drops it. The ranks
    chose differently, and DDP's all-reduced gradients keep their trained values identical."""
    ranks = two_ranks(tmp_path, "failing")
    assert set(ranks[0]["choices"].values()) == {"csr"} and len(ranks[0]["choices"]) == 3
    assert set(ranks[1]["choices"].values()) == {"dense"} and len(ranks[1]["choices"]) == 3
    assert ranks[0]["values"] == ranks[1]["values"]


@pytest.mark.slow
def test_rank_zero_alone_meeting_new_buckets_does_not_hang(tmp_path):
    """After two DDP steps rank 0 alone evaluates a new token count and a new shape, then both train on."""
    ranks = two_ranks(tmp_path, "alone")
    alone = set(ranks[0]["choices"]) - set(ranks[1]["choices"])
    assert any("tokens<=64" in key for key in alone) and any("7x3" in key for key in alone)
    assert ranks[0]["values"] == ranks[1]["values"]
