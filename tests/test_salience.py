"""Salience measures against brute-force references computed with plain autograd, and `calibrate`."""

from __future__ import annotations

import copy

import pytest
import torch
from testing_common import tiny_gpt2, tiny_llama
from peft import get_peft_model
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_speft
from hf_speft import SparsePeftConfig, calibrate, compute_salience, register_salience, sparse_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]


def batches(num=3, batch=2, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, 64, (batch, length), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def base_model():
    torch.manual_seed(0)
    return tiny_llama().eval()


def target_weights(model):
    return {name: module.weight for name, module in model.named_modules()
            if any(name.endswith(t) for t in TARGETS)}


def model_with_trainable_targets():
    model = base_model()
    weights = target_weights(model)
    for w in weights.values():
        w.requires_grad_(True)
    return model, weights


def dense_mean_gradient(data):
    model, weights = model_with_trainable_targets()
    grads = {name: torch.zeros_like(w) for name, w in weights.items()}
    for batch in data:
        loss = model(**batch).loss
        for (name, g) in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            grads[name] += g / len(data)
    return {name: w.detach() for name, w in weights.items()}, grads


def dense_fisher(data):
    model, weights = model_with_trainable_targets()
    sums = {name: torch.zeros_like(w) for name, w in weights.items()}
    count = 0
    for batch in data:
        for i in range(batch["input_ids"].shape[0]):
            sample = {k: v[i:i + 1] for k, v in batch.items()}
            for (name, g) in zip(weights, torch.autograd.grad(model(**sample).loss, list(weights.values()))):
                sums[name] += g.square()
            count += 1
    return {name: s / count for name, s in sums.items()}


REFERENCES = {
    "gradient": lambda w, g: g.abs(),
    "snip": lambda w, g: (w * g).abs(),
    "taylor": lambda w, g: (w * g).square(),
    "skeleton": lambda w, g: -(w * g),
    "magnitude": lambda w, g: w.abs(),
}


@pytest.mark.parametrize("measure", sorted(REFERENCES))
def test_measure_matches_brute_force(measure):
    data = batches()
    weights, grads = dense_mean_gradient(data)
    model = base_model()
    flags = [p.requires_grad for p in model.parameters()]
    scores = compute_salience(model, data, measure=measure, num_batches=3, target_modules=TARGETS,
                              show_progress=False)
    assert set(scores) == set(weights)
    for name in weights:
        expected = REFERENCES[measure](weights[name], grads[name])
        torch.testing.assert_close(scores[name], expected, atol=1e-7, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def dense_grasp(data):
    """(H ḡ) ⊙ W with an explicit Hessian-vector product on trainable target weights."""
    weights, mean_grad = dense_mean_gradient(data)
    model, trainable = model_with_trainable_targets()
    products = {name: torch.zeros_like(w) for name, w in trainable.items()}
    for batch in data:
        with sdpa_kernel(SDPBackend.MATH):  # the default fused attention has no second derivative
            loss = model(**batch).loss
        grads = torch.autograd.grad(loss, list(trainable.values()), create_graph=True)
        inner = sum((g * mean_grad[name]).sum() for name, g in zip(trainable, grads))
        for name, hg in zip(trainable, torch.autograd.grad(inner, list(trainable.values()))):
            products[name] += hg / len(data)
    return {name: products[name] * weights[name] for name in weights}


def dense_force(data, budget, rounds=5):
    """FORCE by hand: dense masked weights, SNIP on them, global top-k by concatenation, geometric schedule."""
    model, trainable = model_with_trainable_targets()
    originals = {name: w.detach().clone() for name, w in trainable.items()}
    total = sum(w.numel() for w in originals.values())
    kept = {name: torch.ones_like(w, dtype=torch.bool) for name, w in originals.items()}
    for round_number in range(1, rounds + 1):
        with torch.no_grad():
            for name, w in trainable.items():
                w.copy_(originals[name] * kept[name])
        grads = {name: torch.zeros_like(w) for name, w in originals.items()}
        for batch in data:
            for name, g in zip(trainable, torch.autograd.grad(model(**batch).loss, list(trainable.values()))):
                grads[name] += g / len(data)
        scores = {name: (originals[name] * grads[name]).abs() for name in originals}
        count = max(budget, round(total * (budget / total) ** (round_number / rounds)))
        flat = torch.cat([value.reshape(-1) for value in scores.values()])
        threshold = flat.topk(count).values.min()
        kept = {name: value >= threshold for name, value in scores.items()}
    return scores


def dense_synflow():
    """SynFlow by hand: |θ| everywhere, activations replaced by identities, all-ones input embeddings."""
    model, trainable = model_with_trainable_targets()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.abs_()
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.Identity()
    output = model(inputs_embeds=torch.ones(1, 16, 32)).logits.double().sum()
    grads = torch.autograd.grad(output, list(trainable.values()))
    return {name: (w.detach().double() * g.double()).abs().float() for (name, w), g in zip(trainable.items(), grads)}


def test_synflow_matches_brute_force_and_restores_the_model():
    model = base_model()
    before = copy.deepcopy(model.state_dict())
    scores = compute_salience(model, None, measure="synflow", target_modules=TARGETS, show_progress=False)
    for name, value in dense_synflow().items():
        assert value.abs().max() > 0
        torch.testing.assert_close(scores[name], value, atol=0, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    inputs = batches(num=1)[0]
    torch.testing.assert_close(model(**inputs).logits, base_model()(**inputs).logits)  # hooks removed


def test_force_matches_brute_force():
    data = batches()
    budget = 500
    scores = compute_salience(base_model(), data, measure="force", num_batches=3, target_modules=TARGETS,
                              show_progress=False, budget=budget)
    for name, value in dense_force(data, budget).items():
        torch.testing.assert_close(scores[name], value, atol=1e-9, rtol=1e-4)
    with pytest.raises(ValueError, match="budget"):
        compute_salience(base_model(), data, measure="force", num_batches=1, target_modules=TARGETS)


@pytest.mark.parametrize(("measure", "reference"), [("fisher", dense_fisher), ("grasp", dense_grasp)])
def test_second_order_measures_match_brute_force(measure, reference):
    """Fisher against a per-sample gradient loop, GraSP against an explicit Hessian-vector product."""
    data = batches()
    expected = reference(data)
    scores = compute_salience(base_model(), data, measure=measure, num_batches=3, target_modules=TARGETS,
                              show_progress=False)
    for name, value in expected.items():
        assert value.abs().max() > 0
        torch.testing.assert_close(scores[name], value, atol=1e-9, rtol=1e-4)


def test_grasp_on_a_trained_adapter_scores_the_effective_weight():
    """With a nonzero delta, GraSP runs on the merged weight (exactly restored afterwards)."""
    model = speft_model(salience="grasp")
    calibrate(model, batches())
    for layer in sparse_layers(model).values():
        layer.speft_values["default"].data.normal_(std=0.05)
    base_weights = {name: layer.get_base_layer().weight.detach().clone()
                    for name, layer in sparse_layers(model).items()}
    scores = compute_salience(model, batches(), measure="grasp", num_batches=3, show_progress=False)
    reference_model = copy.deepcopy(model).merge_and_unload()
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, base_weights[name])
        assert not layer.merged
    # Same score as GraSP on the merged base model.
    for w in reference_model.parameters():
        w.requires_grad_(False)
    expected = compute_salience(reference_model, batches(), measure="grasp", num_batches=3, target_modules=TARGETS,
                                show_progress=False)
    for name, value in scores.items():
        torch.testing.assert_close(value, expected[name.removeprefix("base_model.model.")], atol=1e-9, rtol=1e-4)


def test_a_short_dataloader_is_read_once_and_scores_offloaded_in_bfloat16(caplog):
    """Fewer batches than asked: each is read once (not cycled up to num_batches), the means divide by the batches
    read, and the shortfall is logged."""
    data = batches(num=2)
    reads = []

    class Counting:
        def __len__(self):
            return len(data)

        def __iter__(self):
            for batch in data:
                reads.append(1)
                yield batch

    exact = compute_salience(base_model(), data, measure="gradient", num_batches=2, target_modules=TARGETS,
                             show_progress=False)
    with caplog.at_level("WARNING", logger="hf_speft.salience.context"):
        short = compute_salience(base_model(), Counting(), measure="gradient", num_batches=64,
                                 target_modules=TARGETS, dtype=torch.bfloat16, device="cpu", show_progress=False)
    assert len(reads) == 2
    assert "used all 2 batches of its dataloader, fewer than the 64 asked for" in caplog.text
    for name in exact:
        assert short[name].dtype == torch.bfloat16
        torch.testing.assert_close(short[name].float(), exact[name], atol=1e-3, rtol=1e-2)


def speft_model(**kwargs):
    config = dict(target_modules=TARGETS, density=0.05, salience="gradient", salience_batches=3)
    config.update(kwargs)
    return get_peft_model(base_model(), SparsePeftConfig(**config))


@pytest.mark.parametrize("scope", ["global", "local"])
def test_calibrate_builds_exact_deterministic_masks(scope):
    first, second = speft_model(mask_scope=scope), speft_model(mask_scope=scope)
    counts = calibrate(first, batches())
    calibrate(second, batches())
    total = sum(layer.out_features * layer.in_features for layer in sparse_layers(first).values())
    assert sum(counts.values()) == round(0.05 * total)
    for name, layer in sparse_layers(first).items():
        assert torch.equal(layer.speft_indices["default"], sparse_layers(second)[name].speft_indices["default"])
    weights, grads = dense_mean_gradient(batches())
    if scope == "global":  # each layer's best entry, then the best of all the others ranked together
        rest = torch.cat([g.abs().reshape(-1).sort(descending=True).values[1:] for g in grads.values()])
        threshold = rest.topk(sum(counts.values()) - len(grads)).values.min()
        for name, layer in sparse_layers(first).items():
            key = name.removeprefix("base_model.model.")
            selected = grads[key].abs().reshape(-1)[layer.speft_indices["default"].long()].sort(descending=True).values
            assert selected[0] == grads[key].abs().max()
            assert (selected[1:] >= threshold * (1 - 1e-5)).all()
    first.train()
    first(**batches()[0]).loss.backward()  # calibrated adapters train


def test_calibrate_includes_the_current_delta():
    model = speft_model(salience="magnitude", init_weights=False)
    name, layer = next(iter(sparse_layers(model.base_model.model).items()))
    scores = next(hf_speft.masks.adapter_salience_groups(model, "default"))  # one group: every layer
    expected = layer.get_base_layer().weight.detach().clone().reshape(-1)
    expected[layer.speft_indices["default"].long()] += layer.speft_values["default"].detach()
    torch.testing.assert_close(scores[name].reshape(-1), expected.abs())


def test_calibrate_errors_are_clear():
    model = speft_model()
    unlabeled = [{"input_ids": b["input_ids"]} for b in batches()]
    with pytest.raises(ValueError, match="labels"):
        calibrate(model, unlabeled)
    with pytest.raises(ValueError, match="needs data"):
        calibrate(model, None)
    with pytest.raises(ValueError, match="no batch"):
        calibrate(model, [])
    with pytest.raises(TypeError, match="SPEFT adapter"):
        calibrate(base_model(), batches())
    with pytest.raises(ValueError, match="No targeted module"):
        compute_salience(base_model(), batches(), target_modules=["not_a_module"], show_progress=False)
    with pytest.raises(ValueError, match="micro_batch_size=0 is not allowed; it must be a positive integer"):
        compute_salience(base_model(), batches(), target_modules=TARGETS, micro_batch_size=0)


def test_register_custom_measure():
    def row_index(ctx):
        return {name: torch.arange(ctx.shape(name)[0]).float()[:, None].expand(ctx.shape(name)).clone()
                for name in ctx.layers}

    register_salience("row_index", row_index, data_free=True, overwrite=True)
    model = speft_model(salience="row_index", num_params=10, density=None, mask_scope="local")
    assert "row_index" in hf_speft.available_measures()
    for layer in sparse_layers(model).values():
        rows = layer.speft_indices["default"].long() // layer.in_features
        assert (rows >= layer.out_features - 2).all()  # the highest rows win
    with pytest.raises(ValueError, match="already registered"):
        register_salience("row_index", row_index)
    register_salience("bad_shape", lambda ctx: {n: torch.zeros(2) for n in ctx.layers}, data_free=True,
                      overwrite=True)
    with pytest.raises(ValueError, match="returned shape"):
        speft_model(salience="bad_shape")


def test_calibration_leaves_model_untouched_and_in_its_mode():
    model = speft_model()
    model.train()
    before = copy.deepcopy(model.state_dict())
    calibrate(model, batches())
    assert model.training
    for key, value in model.state_dict().items():
        if "speft_" not in key:
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(("measure", "scope"), [("gradient", "global"), ("gradient", "local"), ("snip", "global"),
                                                ("fisher", "global"), ("magnitude", "global"), ("random", "local"),
                                                ("synflow", "global")])
def test_grouped_salience_selects_the_same_masks(measure, scope):
    """salience_groups=3 scores a third of the layers per pass; the masks equal one pass over all of them."""
    masks = []
    for groups in (1, 3):
        model = speft_model(salience=measure, mask_scope=scope, salience_groups=groups)
        if measure not in ("magnitude", "random", "synflow"):
            calibrate(model, batches(), show_progress=False)
        masks.append({name: layer.speft_indices["default"] for name, layer in sparse_layers(model).items()})
    assert len(masks[0]) > 3
    for name, indices in masks[0].items():
        assert torch.equal(masks[1][name], indices), name


def test_grouped_salience_reads_each_batch_once():
    """Every group is scored on the same batches, read from the dataloader once (a shuffling loader would
    otherwise give each group different data)."""
    reads = []

    class CountingLoader:
        def __iter__(self):
            reads.append(1)
            return iter(batches())

    calibrate(speft_model(salience_groups=3), CountingLoader(), show_progress=False)
    assert len(reads) == 1


def padded_batches(num=2, batch=5, length=7, seed=3):
    """Causal-LM batches whose rows hold different numbers of label tokens (-100 on a random right padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, 64, (batch, length), generator=g)
        lengths = torch.randint(2, length + 1, (batch,), generator=g)
        keep = torch.arange(length)[None, :] < lengths[:, None]
        out.append({"input_ids": ids, "attention_mask": keep.long(), "labels": ids.masked_fill(~keep, -100)})
    return out


@pytest.mark.parametrize("measure", ["gradient", "snip", "fisher", "grasp", "force"])
@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_micro_batches_give_the_scores_of_whole_batches(measure, micro_batch_size):
    """Rows with different label-token counts, uneven splits: each micro-batch's loss is weighted by its share of
    the batch's (shifted) label tokens, so the scores equal whole-batch scores."""
    data = padded_batches()
    whole = compute_salience(base_model(), data, measure=measure, num_batches=2, target_modules=TARGETS,
                             show_progress=False, budget=50)
    model, rows_seen = base_model(), []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    split = compute_salience(model, data, measure=measure, num_batches=2, target_modules=TARGETS,
                             show_progress=False, budget=50, micro_batch_size=micro_batch_size)
    assert max(rows_seen) == micro_batch_size
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-8, rtol=1e-4)


def test_micro_batches_of_a_classifier_weight_rows():
    """Per-example labels (sequence classification): micro-batch losses are weighted by their share of rows."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 64, (5, 6), generator=g), "labels": torch.randint(0, 3, (5,), generator=g)}
            for _ in range(2)]
    whole = compute_salience(model, data, num_batches=2, target_modules=TARGETS, show_progress=False)
    split = compute_salience(model, data, num_batches=2, target_modules=TARGETS, show_progress=False,
                             micro_batch_size=2)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-8, rtol=1e-4)


def whole_and_micro_batch_scores(model_factory, targets, data=None):
    """Gradient scores of the same batches, whole and in micro-batches of 2 rows."""
    data = padded_batches() if data is None else data
    scores = []
    for micro_batch_size in (None, 2):
        torch.manual_seed(0)
        scores.append(compute_salience(model_factory().eval(), data, num_batches=2, target_modules=targets,
                                       show_progress=False, micro_batch_size=micro_batch_size))
    return scores


def renamed_loss_type(model):
    model.loss_type = "ForCausalLMRenamed"  # a name transformers' LOSS_MAPPING does not hold
    return model


@pytest.mark.parametrize("model_factory, targets", [
    (tiny_gpt2, ["c_attn", "c_proj"]),  # GPT2LMHeadModel: loss_type None, transformers falls back to ForCausalLMLoss
    (lambda: renamed_loss_type(tiny_llama()), TARGETS),
])
def test_micro_batches_weigh_a_causal_lm_whatever_its_loss_type_is_called(model_factory, targets):
    whole, split = whole_and_micro_batch_scores(model_factory, targets)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-8, rtol=1e-4)


def test_micro_batches_refuse_a_loss_they_do_not_know(monkeypatch):
    """A loss function transformers renamed or added: how it counts label tokens is unknown, so micro-batches are
    refused before any backward pass (whole batches still work: they need no count)."""
    from transformers.loss import loss_utils

    def renamed_causal_lm_loss(*args, **kwargs):
        return loss_utils.ForCausalLMLoss(*args, **kwargs)

    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", renamed_causal_lm_loss)
    with pytest.raises(ValueError, match="its loss 'renamed_causal_lm_loss' \\(loss_type 'ForCausalLM'\\) is not one "
                                         "hf_speft knows .*shift_labels"):
        whole_and_micro_batch_scores(tiny_llama, TARGETS)
    compute_salience(tiny_llama(), padded_batches(), num_batches=1, target_modules=TARGETS, show_progress=False)


def test_micro_batches_refuse_an_unknown_loss_type_of_a_model_that_does_not_generate():
    from transformers import LlamaConfig, LlamaForTokenClassification

    def token_classifier():
        model = LlamaForTokenClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, num_labels=64))
        model.loss_type = "ForTokenClassificationRenamed"
        return model

    with pytest.raises(ValueError, match="LlamaForTokenClassification: its loss_type 'ForTokenClassificationRenamed' "
                                         "is unknown"):
        compute_salience(token_classifier(), padded_batches(), target_modules=TARGETS, show_progress=False,
                         micro_batch_size=2)


def test_micro_batches_of_shift_labels_need_no_loss_lookup(monkeypatch):
    """Batches that carry `shift_labels` are counted from them: even an unknown loss is weighted right."""
    from transformers.loss import loss_utils

    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", lambda *a, **k: loss_utils.ForCausalLMLoss(*a, **k))
    data = []
    for batch in padded_batches():
        labels = batch["labels"]
        data.append({**batch, "shift_labels": torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)})
    whole, split = whole_and_micro_batch_scores(tiny_llama, TARGETS, data)
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, atol=1e-8, rtol=1e-4)


def test_calibrate_with_micro_batches_selects_the_same_masks():
    masks = []
    for micro_batch_size in (None, 2):
        model = speft_model(salience_micro_batch_size=micro_batch_size)
        calibrate(model, padded_batches(), show_progress=False)
        masks.append({name: layer.speft_indices["default"] for name, layer in sparse_layers(model).items()})
    for name, indices in masks[0].items():
        assert torch.equal(masks[1][name], indices), name


def test_scores_accumulate_in_the_score_dtype(monkeypatch):
    """bfloat16 scores accumulate in bfloat16 buffers: no float32 buffer of every target's size exists at once."""
    from hf_speft.salience import gradients

    created = []
    original = gradients._score_buffer

    def recording(ctx, name, like):
        buffer = original(ctx, name, like)
        created.append(buffer.dtype)
        return buffer

    monkeypatch.setattr(gradients, "_score_buffer", recording)
    for measure in ("gradient", "fisher"):
        created.clear()
        compute_salience(base_model(), batches(), measure=measure, num_batches=3, target_modules=TARGETS,
                         dtype=torch.bfloat16, show_progress=False)
        assert created == [torch.bfloat16] * len(TARGETS) * 2, measure  # 2 layers of each target
