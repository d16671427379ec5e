"""The scoped fold (`hf_speft.fold`, `fold_weights="auto"`, the default): W0+Δ exists in the base weight only inside
the layer's own GEMMs, so every reader sees W0 bit for bit at every other moment, gradients equal the unfolded
path's in every autograd ordering (FOLD_NOTES §6), and bf16 bases compute with a bf16 merge's weight."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from peft import get_peft_model
from testing_common import MODELS, build, inputs_for, logits
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_speft import SparsePeftConfig, fold, ops, sparse_layers


@pytest.fixture
def folds(monkeypatch):
    """The number of folds written so far (forward and backward GEMMs); merges are not counted."""
    calls = []
    original = fold.entries_with_delta
    monkeypatch.setattr(fold, "entries_with_delta", lambda *args: calls.append(1) or original(*args))
    return calls


def config(name="llama", fold_weights="auto", **options) -> SparsePeftConfig:
    return SparsePeftConfig(**{"target_modules": MODELS[name][1], "density": 0.1, "salience": "magnitude",
                               "init_weights": False, "fold_weights": fold_weights, **options})


def pair(name="llama", dtype=None, **options):
    """(unfolded, folded) models with the same masks and nonzero values."""
    def make(fold_weights):
        base = build(name) if dtype is None else build(name).to(dtype)
        return get_peft_model(base, config(name, fold_weights, **options))
    return make(False), make("auto")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()]).clone()


def base_bits(model) -> dict[str, torch.Tensor]:
    return {name: bits(layer.base_layer.weight) for name, layer in sparse_layers(model).items()}


def assert_base_is_w0(model, w0: dict[str, torch.Tensor]) -> None:
    """Every way of reading a base weight gives W0's bits: `.data`, `named_parameters`, `state_dict` of the model
    and of the base layer."""
    params, state = dict(model.named_parameters()), model.state_dict()
    for name, layer in sparse_layers(model).items():
        expected = w0[name]
        assert torch.equal(bits(layer.base_layer.weight.data), expected), name
        assert torch.equal(bits(params[f"{name}.base_layer.weight"]), expected), name
        assert torch.equal(bits(state[f"{name}.base_layer.weight"]), expected), name
        assert torch.equal(bits(layer.base_layer.state_dict()["weight"]), expected), name


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def assert_same_grads(unfolded, folded, atol=1e-6, rtol=1e-5) -> None:
    expected, got = trainable_grads(unfolded), trainable_grads(folded)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def loss_of(model, name="llama", seed=1):
    out = model(**inputs_for(name, seed=seed))
    return out["loss"] if isinstance(out, dict) else out.loss


def test_layers_on_one_input_save_one_copy_of_it_and_a_no_grad_forward_none(folds, monkeypatch):
    """q, k and v (and gate and up) save one shared tokens-last copy of their input for the values' gradient, as
    they shared one saved x before; o_proj, whose input is a view of attention's output, saves that input itself (a
    copy would add to what attention keeps); an evaluation forward copies nothing."""
    copies = []
    monkeypatch.setattr(fold, "input_for_values_grad",
                        lambda *args: copies.append(ops.input_for_values_grad(*args)) or copies[-1])
    _, model = pair()
    model.train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = loss_of(model)
    assert folds and len(copies) == 7 * 2  # seven folded layers in each of two decoder layers
    shared = {copy.data_ptr() for copy in copies}
    assert len(shared) == 4 * 2  # q/k/v, o, gate/up and down each read one input
    assert sum(copy.is_contiguous() for copy in copies) == 2  # o_proj's input itself, in each decoder layer
    assert shared <= {t.data_ptr() for t in saved}
    loss.backward()
    copies.clear()
    with torch.no_grad():
        loss_of(model)
    assert not copies


# ------------------------------------------------------------------------------------------ W is W0 at every read
@pytest.mark.parametrize("name", ["mlp", "gpt2-conv1d", "llama"])
def test_every_reader_sees_w0_between_forward_backward_and_after_no_grad_forwards(name, folds):
    _, model = pair(name)
    w0 = base_bits(model)
    model.train()
    loss = loss_of(model, name)
    assert folds  # the forward folded
    assert_base_is_w0(model, w0)  # after a grad forward, before its backward
    loss.backward()
    assert_base_is_w0(model, w0)
    with torch.no_grad():
        logits(model, inputs_for(name))
    assert_base_is_w0(model, w0)
    with torch.inference_mode():
        logits(model, inputs_for(name))
    assert_base_is_w0(model, w0)


# ------------------------------------------------------------------------------------------- exact gradients
class One(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24) if kind == "linear" else Conv1D(24, 16)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_x_values_and_trainable_bias_gradients_equal_the_unfolded_path(kind, dtype, folds):
    results = []
    for fold_weights in (False, "auto"):
        torch.manual_seed(0)
        model = get_peft_model(One(kind).to(dtype), SparsePeftConfig(
            target_modules=["lin"], density=0.2, salience="magnitude", init_weights=False, fold_weights=fold_weights))
        layer = model.base_model.model.lin
        layer.base_layer.bias.requires_grad_(True)
        x = torch.randn(3, 5, 16, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad, layer.speft_values["default"].grad, layer.base_layer.bias.grad))
    assert folds
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-11}
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, **tolerance)
    assert torch.equal(results[0][2], results[1][2])  # the values' gradient: the same op on the same g and x


def dpo_pattern(model):
    loss = loss_of(model)
    with torch.no_grad(), model.disable_adapter():  # trl's reference forward between the policy's forward and backward
        logits(model, inputs_for("llama", seed=5))
    loss.backward()


def two_forwards_one_backward(model):
    (loss_of(model, seed=1) + loss_of(model, seed=2)).backward()


def retain_graph_twice(model):
    loss = loss_of(model)
    loss.backward(retain_graph=True)
    loss.backward()


def micro_batches_with_optimizer_steps(model):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        loss_of(model, seed=step).backward()
        optimizer.step()
    loss_of(model, seed=7).backward()


@pytest.mark.parametrize("run", [dpo_pattern, two_forwards_one_backward, retain_graph_twice,
                                 micro_batches_with_optimizer_steps])
def test_gradients_equal_the_unfolded_path_in_every_ordering(run, folds):
    unfolded, folded = pair()
    w0 = base_bits(folded)
    for model in (unfolded, folded):
        model.train()
        run(model)
    assert folds
    assert_same_grads(unfolded, folded)
    assert_base_is_w0(folded, w0)


@pytest.mark.parametrize("target", ["values", "x"])
def test_autograd_grad_with_inputs(target):
    results = []
    for model in pair():
        model.train()
        layer = sparse_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
        embeds = model.get_input_embeddings()(inputs_for("llama")["input_ids"]).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=inputs_for("llama")["labels"]).loss
        inputs = [layer.speft_values["default"]] if target == "values" else [embeds]
        results.append(torch.autograd.grad(loss, inputs)[0])
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_keeps_exact_gradients(use_reentrant, folds):
    models = pair()
    w0 = base_bits(models[1])
    for model in models:
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.enable_input_require_grads()
        loss_of(model).backward()
    assert folds
    assert_same_grads(*models)
    assert_base_is_w0(models[1], w0)


# ------------------------------------------------------------------------------------------- failures
def test_an_exception_in_the_gemm_or_the_backward_leaves_w0_exact(monkeypatch):
    unfolded, folded = pair()
    w0 = base_bits(folded)
    folded.train()
    real_linear = nn.functional.linear

    def interrupted(*args, **kwargs):
        monkeypatch.setattr(nn.functional, "linear", real_linear)
        raise KeyboardInterrupt

    monkeypatch.setattr(nn.functional, "linear", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loss_of(folded)
    assert_base_is_w0(folded, w0)
    loss = loss_of(folded)
    loss.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("from a backward hook")))
    with pytest.raises(RuntimeError, match="from a backward hook"):
        loss.backward()
    assert_base_is_w0(folded, w0)
    unfolded.train()
    loss_of(unfolded).backward()
    loss_of(folded).backward()  # the next step is exact
    assert_same_grads(unfolded, folded)


def test_a_versioned_write_between_forward_and_backward_raises():
    _, folded = pair()
    folded.train()
    loss = loss_of(folded)
    with torch.no_grad():
        sparse_layers(folded)["base_model.model.model.layers.0.mlp.down_proj"].base_layer.weight.mul_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_another_module_on_the_same_weight_sees_w0_between_forward_and_backward():
    _, folded = pair()
    layer = sparse_layers(folded)["base_model.model.model.layers.0.self_attn.q_proj"]
    reference = copy.deepcopy(layer.base_layer)
    sharing = nn.Linear(layer.in_features, layer.out_features, bias=False)
    sharing.weight = layer.base_layer.weight
    folded.train()
    loss = loss_of(folded)
    x = torch.randn(2, layer.in_features)
    assert torch.equal(sharing(x), reference(x))
    loss.backward()


# ------------------------------------------------------------------------------------------- where it does not fold
def test_hooked_and_compiled_bases_run_unfolded_with_the_same_output(folds):
    unfolded, folded = pair("mlp")
    batch = inputs_for("mlp")
    expected = logits(unfolded, batch)
    layer = sparse_layers(folded)["base_model.model.lin0"]
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: None)
    for other in sparse_layers(folded).values():
        if other is not layer:
            other.speft_fold_weights["default"] = False
    torch.testing.assert_close(logits(folded, batch), expected)
    assert not folds  # the hooked base ran through its own call
    handle.remove()
    compiled = torch.compile(folded, backend="aot_eager")
    torch.testing.assert_close(compiled(X=batch["X"])["logits"], expected)
    assert not folds


def test_fold_blocker_names_what_cannot_fold():
    assert fold.fold_blocker(nn.Linear(2, 2).requires_grad_(False)) is None
    assert "trainable" in fold.fold_blocker(nn.Linear(2, 2))
    assert "meta" in fold.fold_blocker(nn.Linear(2, 2, device="meta").requires_grad_(False))
    view = nn.Linear(2, 2).requires_grad_(False)
    view.weight = nn.Parameter(torch.zeros(8)[:4].view(2, 2), requires_grad=False)
    assert "view into a larger storage" in fold.fold_blocker(view)
    hooked = nn.Linear(2, 2).requires_grad_(False)
    hooked.register_forward_pre_hook(lambda *args: None)
    assert "hooks" in fold.fold_blocker(hooked)


def test_fold_weights_true_raises_where_auto_runs_unfolded():
    model = get_peft_model(build("mlp"), config("mlp", True))
    sparse_layers(model)["base_model.model.lin0"].base_layer.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="fold_weights=True cannot fold adapter 'default' here: its base layer has"):
        logits(model, inputs_for("mlp"))
    model.add_adapter("other", config("mlp", "auto", salience="random"))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="supports one active adapter"):
        logits(model, inputs_for("mlp"))


def test_two_threads_folding_one_layer_keep_w0_exact():
    torch.manual_seed(0)
    model = get_peft_model(One("linear"), SparsePeftConfig(target_modules=["lin"], density=0.3, salience="magnitude",
                                                          init_weights=False))
    layer = model.base_model.model.lin
    w0, x = bits(layer.base_layer.weight), torch.randn(64, 16)
    expected = model(x)
    failures = []

    def work():
        for _ in range(100):
            if not torch.equal(model(x), expected):
                failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and torch.equal(bits(layer.base_layer.weight), w0)


# ------------------------------------------------------------------------------------------- bf16: AMP semantics
def test_bf16_training_forward_equals_the_bf16_merge_bit_for_bit(folds):
    _, model = pair(dtype=torch.bfloat16)
    merged = copy.deepcopy(model).merge_and_unload()
    batch = inputs_for("llama")
    model.train()
    out = logits(model, batch)
    assert folds and out.requires_grad
    assert torch.equal(bits(out), bits(logits(merged.train(), batch)))


def ulp(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at each entry (8 significant bits)."""
    return torch.ldexp(torch.ones_like(weight, dtype=torch.float32), torch.frexp(weight.float()).exponent - 8)


def test_sub_ulp_values_vanish_and_accumulate_in_float32_until_they_matter():
    torch.manual_seed(0)
    model = get_peft_model(One("linear").to(torch.bfloat16), SparsePeftConfig(
        target_modules=["lin"], density=0.2, salience="magnitude"))
    layer = model.base_model.model.lin
    base = copy.deepcopy(layer.base_layer)
    values, indices = layer.speft_values["default"], layer.speft_indices["default"].long()
    assert values.dtype == torch.float32
    w0 = base.weight.detach().view(-1)[indices]
    step = ulp(w0) / 10
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        values.copy_(step)
    assert torch.equal(model(x), base(x))  # a tenth of an ulp: the base model's forward
    for _ in range(19):  # 20 tenths: two ulps, each change alone far below bf16's resolution of W0
        with torch.no_grad():
            values.add_(step)
    merged = base.weight.detach().clone()
    merged.view(-1)[indices] = (w0.float() + values.detach()).to(torch.bfloat16)
    assert (merged.view(-1)[indices] != w0).all()
    assert torch.equal(model(x), nn.functional.linear(x, merged, base.bias))  # the bf16 merge, nothing lost


def test_bf16_folded_and_unfolded_loss_trajectories_agree_over_30_steps():
    """Folded: the bf16 merge's weight; unfolded: bf16 base output plus a sparse correction. The two round
    differently (each in bf16), so losses agree to bf16's resolution, not bit for bit: within 2% over 30 AdamW steps."""
    trajectories = []
    for model in pair(dtype=torch.bfloat16):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(30):
            loss = loss_of(model, seed=step % 4)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        trajectories.append(losses)
    unfolded, folded = trajectories
    assert folded[-1] < folded[0] - 0.1  # it trains
    assert folded == pytest.approx(unfolded, rel=2e-2)


# ------------------------------------------------------------------------------------------- hybrid mode
def test_hybrid_folds_the_sparse_part_and_adds_the_low_rank_part(folds):
    unfolded, folded = pair(lora_r=1, lora_alpha=1, match_lora_rank=2, density=None)  # scaling 1: moderate B·A
    batch = inputs_for("llama")
    torch.testing.assert_close(logits(folded, batch), logits(unfolded, batch), atol=1e-5, rtol=1e-5)
    for model in (unfolded, folded):
        model.train()
        loss_of(model).backward()
    assert folds
    assert_same_grads(unfolded, folded)
    assert any("speft_lora_A" in name for name in trainable_grads(folded))


def test_the_hybrid_saves_x_itself_for_the_values_gradient_as_its_low_rank_part_does(folds):
    """Where the low-rank part saves x anyway, a tokens-last copy would add to memory: folded or not, the hybrid
    saves no more for backward than the same model saving x itself, while the sparse-only model saves the same
    with or without its copies (they replace x)."""
    from hf_speft.memory import saved_for_backward_bytes

    def saved(model, keep_x):
        original = ops.input_for_values_grad
        plain = (lambda x, *_: x.detach().reshape(-1, x.shape[-1])) if keep_x else original
        try:
            fold.input_for_values_grad = ops.input_for_values_grad = plain
            return saved_for_backward_bytes(model.train(), inputs_for("llama"))
        finally:
            fold.input_for_values_grad = ops.input_for_values_grad = original

    for options in ({"lora_r": 1, "lora_alpha": 1, "match_lora_rank": 2, "density": None}, {}):
        for model in pair(**options):
            assert saved(model, keep_x=False) == saved(model, keep_x=True)
    assert folds


# ------------------------------------------------------------------------------------------- trainers, dynamic masks
def test_dynamic_mask_updates_keep_exact_gradients(folds):
    """After a mask update the delta has a frozen residual: it is folded with the mask, its gradient is none."""
    unfolded, folded = pair()
    for model in (unfolded, folded):
        for layer in sparse_layers(model).values():
            numel = layer.out_features * layer.in_features
            moved = (layer.speft_indices["default"].long() + numel // 2) % numel  # mostly new entries
            layer.update_mask("default", moved.sort().values)
        assert any("default" in layer.speft_residual_indices for layer in sparse_layers(model).values())
        model.train()
        loss_of(model).backward()
    assert folds
    assert_same_grads(unfolded, folded)
    batch = inputs_for("llama", seed=3)
    torch.testing.assert_close(logits(folded, batch), logits(unfolded, batch), atol=1e-5, rtol=1e-5)


def trained_values(trainer) -> torch.Tensor:
    trainer.train()
    return torch.cat([layer.speft_values["default"].detach() for layer in sparse_layers(trainer.model).values()])


def test_speft_trainer_with_dynamic_updates_trains_alike_folded_or_not(tmp_path, folds):
    from trainer_helpers import speft_model, speft_trainer

    runs = [trained_values(speft_trainer(speft_model(fold_weights=fold_weights, mask_update="dynamic",
                                                     update_interval=2), tmp_path / str(fold_weights),
                                         max_steps=4, optim="sgd", learning_rate=1e-2))
            for fold_weights in (False, "auto")]
    assert folds and runs[0].abs().sum() > 0
    torch.testing.assert_close(runs[1], runs[0], atol=1e-6, rtol=1e-4)


def test_sft_trainer_trains_alike_folded_or_not(tmp_path, folds):
    from test_trl import TARGETS, counting_prompts, word_tokenizer
    from trainer_helpers import speft_model
    from trl import SFTConfig

    import hf_speft

    runs = []
    for fold_weights in (False, "auto"):
        args = SFTConfig(str(tmp_path / str(fold_weights)), max_steps=3, per_device_train_batch_size=8,
                         learning_rate=1e-2, optim="sgd", report_to=[], save_strategy="no", use_cpu=True,
                         disable_tqdm=True, completion_only_loss=True, bf16=False)
        runs.append(trained_values(hf_speft.SpeftSFTTrainer(
            model=speft_model(target_modules=TARGETS, fold_weights=fold_weights), args=args,
            train_dataset=counting_prompts(), processing_class=word_tokenizer())))
    assert folds and runs[0].abs().sum() > 0
    torch.testing.assert_close(runs[1], runs[0], atol=1e-6, rtol=1e-4)


def test_autocast_computes_with_the_cast_of_the_folded_fp32_weight():
    """An fp32 base under bf16 autocast: the fold's product is autocast's bf16 cast of W0+Δ (AMP's master-weight
    copy), bit for bit, and the gradients match the unfolded path to bf16's resolution."""
    results = []
    for fold_weights in (False, "auto"):
        torch.manual_seed(0)
        model = get_peft_model(One("linear"), SparsePeftConfig(target_modules=["lin"], density=0.2,
                                                              salience="magnitude", init_weights=False,
                                                              fold_weights=fold_weights))
        layer = model.base_model.model.lin
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        results.append((out.detach(), x.grad, layer.speft_values["default"].grad))
    merged = layer.base_layer.weight.detach().clone()
    merged.view(-1)[layer.speft_indices["default"].long()] += layer.speft_values["default"].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(results[1][0], nn.functional.linear(x.detach(), merged, layer.base_layer.bias))
    for expected, got in zip(*results):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
