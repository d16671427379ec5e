"""Every bad config field and every corrupted adapter file raises a clear, documented error."""

from __future__ import annotations

import json

import pytest
import torch
from testing_common import tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from hf_speft import CorruptAdapterError, SparsePeftConfig, calibrate, sparse_layers
from hf_speft.layer import SparsePeftLayer

TARGETS = ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": 0.1, "num_params": 5}, "at most one budget"),
        ({"num_params": 5, "match_lora_rank": 8}, "at most one budget"),
        ({"density": 0.0}, "0 < density <= 1"),
        ({"density": 1.5}, "0 < density <= 1"),
        ({"density": True}, "0 < density <= 1"),
        ({"num_params": 0}, "positive integer"),
        ({"num_params": 2.5}, "positive integer"),
        ({"match_lora_rank": -1}, "positive integer"),
        ({"density": 0.1, "mask_scope": "per-layer"}, "mask_scope='per-layer'"),
        ({"density": 0.1, "salience_batches": 0}, "salience_batches"),
        ({"density": 0.1, "salience_dtype": "float16"}, "salience_dtype"),
        ({"density": 0.1, "salience_micro_batch_size": 0}, "salience_micro_batch_size=0"),
        ({"density": 0.1, "salience_micro_batch_size": "4"}, "salience_micro_batch_size='4'"),
        ({"density": 0.1, "seed": "1"}, "seed"),
        ({"density": 0.1, "mask_update": "every-step"}, "mask_update='every-step'"),
        ({"density": 0.1, "update_interval": 0}, "update_interval=0"),
        ({"density": 0.1, "update_interval": 2.5}, "update_interval=2.5"),
        ({"density": 0.1, "reset_optimizer": "none"}, "reset_optimizer='none'"),
        ({"density": 0.1, "target_modules": ".*proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"density": 0.1, "layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
        ({"density": 0.1, "salience_groups": 0}, "salience_groups=0 is not allowed; it must be a positive integer"),
        ({"match_lora_rank": 4, "lora_r": -1}, "lora_r=-1 must be a non-negative integer"),
        ({"match_lora_rank": 4, "lora_r": 2, "lora_alpha": 0}, "lora_alpha=0 must be a positive number"),
        ({"match_lora_rank": 4, "lora_r": 2, "lora_dropout": 1.0}, "lora_dropout=1.0 must satisfy"),
        ({"density": 0.1, "fold_weights": "always"}, r"fold_weights='always' is not allowed; use one of \(True"),
        ({"density": 0.1, "fold_weights": 1}, "fold_weights=1 is not allowed"),
    ],
)
def test_bad_config_fields(kwargs, message):
    """Every config field's refusal, in one table (budgets, salience, dynamic masks, hybrid mode)."""
    with pytest.raises(ValueError, match=message):
        SparsePeftConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"salience": "gradientt"}, "salience='gradientt' is not a registered measure"),
        ({"salience": "grasp", "salience_groups": 2}, "salience='grasp' scores all layers together"),
        ({"salience": "force", "salience_groups": 2}, "salience='force' scores all layers together"),
    ],
)
def test_a_mask_is_built_only_with_a_registered_measure_that_fits(kwargs, message):
    """The measure is checked where a mask is built (not when a config is built or loaded): injection refuses it
    before any module changes, and so does `calibrate`."""
    config = SparsePeftConfig(target_modules=TARGETS, density=0.1, **kwargs)
    base = tiny_llama()
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, config)
    assert not any(isinstance(module, SparsePeftLayer) for module in base.modules())
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, density=0.1))
    for key, value in kwargs.items():
        setattr(model.peft_config["default"], key, value)
    with pytest.raises(ValueError, match=message):
        calibrate(model, [])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_params": 10**9}, "hold only"), ({"density": 1e-9}, "selects no weight")],
)
def test_budget_that_does_not_fit_the_targets(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, salience="magnitude", **kwargs))


def test_target_modules_alone_is_a_working_config_with_the_budget_of_a_rank_8_lora():
    from peft import LoraConfig

    config = SparsePeftConfig(target_modules=TARGETS, salience="magnitude")
    assert config.match_lora_rank == LoraConfig().r == 8 and config.density is None and config.num_params is None
    model = get_peft_model(tiny_llama(), config)
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    assert model.get_nb_trainable_parameters() == lora.get_nb_trainable_parameters()


def test_the_default_salience_follows_the_task_and_is_saved_as_resolved(tmp_path):
    """Causal LMs default to magnitude (data-free: the mask exists after get_peft_model, no calibration), other tasks
    to the paper's gradient; an explicit measure always wins, and a saved config names its measure."""
    from peft import PeftConfig, TaskType

    causal = SparsePeftConfig(task_type=TaskType.CAUSAL_LM, target_modules=TARGETS)
    assert causal.salience == "magnitude" and SparsePeftConfig(task_type="CAUSAL_LM").salience == "magnitude"
    assert SparsePeftConfig().salience == SparsePeftConfig(task_type="SEQ_CLS").salience == "gradient"
    assert SparsePeftConfig(task_type="CAUSAL_LM", salience="gradient").salience == "gradient"
    model = get_peft_model(tiny_llama(), causal)
    assert model.get_nb_trainable_parameters()[0] > 0  # calibrated at injection
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["salience"] == "magnitude"
    assert PeftConfig.from_pretrained(tmp_path).salience == "magnitude"


def test_budget_arithmetic():
    shapes = [(32, 32), (16, 32)]
    assert SparsePeftConfig(density=0.25).total_budget(shapes) == round(0.25 * (1024 + 512))
    assert SparsePeftConfig(num_params=77).total_budget(shapes) == 77
    assert SparsePeftConfig(match_lora_rank=4).total_budget(shapes) == 4 * (64 + 48)


def test_match_lora_rank_equals_lora_trainable_count():
    from peft import LoraConfig

    torch.manual_seed(0)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    speft = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, match_lora_rank=4,
                                                          salience="magnitude"))
    assert speft.get_nb_trainable_parameters()[0] == lora.get_nb_trainable_parameters()[0]


def test_unsupported_target_module():
    with pytest.raises(TypeError, match="not supported by SPEFT"):
        get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=["embed_tokens"], density=0.1,
                                                      salience="magnitude"))


def model_state(model: torch.nn.Module) -> tuple:
    """Everything a refused injection must leave alone: module names and types, parameter and buffer values, and
    which parameters train."""
    return ([(name, type(module)) for name, module in model.named_modules()],
            {name: (tensor.detach().clone(), tensor.requires_grad)
             for name, tensor in [*model.named_parameters(), *model.named_buffers()]})


def assert_same_state(model: torch.nn.Module, before: tuple) -> None:
    modules, tensors = model_state(model)
    assert modules == before[0]
    assert tensors.keys() == before[1].keys()
    for name, (tensor, requires_grad) in tensors.items():
        assert torch.equal(tensor, before[1][name][0]) and requires_grad == before[1][name][1], name


REFUSED_INJECTIONS = [
    ({"target_modules": TARGETS, "num_params": 10**9}, ValueError, "hold only"),
    ({"target_modules": TARGETS, "density": 1e-9}, ValueError, "selects no weight"),
    ({"target_modules": ["embed_tokens"], "density": 0.1}, TypeError, "not supported by SPEFT"),
    ({"target_modules": ["q_proj", "norm"], "density": 0.1}, TypeError, "not supported by SPEFT"),  # after q_proj
    ({"target_modules": TARGETS, "density": 0.1, "fold_weights": True}, ValueError, "needs a plain floating-point"),
]


def make_refusable(model: torch.nn.Module) -> torch.nn.Module:
    """Mark the last v_proj weight as a DeepSpeed ZeRO-3 partition (not writable: `fold_weights` is refused there,
    after the layers before it are wrapped) and freeze one parameter as a user may."""
    model.get_submodule("model.layers.1.self_attn.v_proj").weight.ds_id = 0
    model.get_submodule("model.embed_tokens").weight.requires_grad_(False)
    return model


@pytest.mark.parametrize(("kwargs", "error", "message"), REFUSED_INJECTIONS)
def test_a_refused_get_peft_model_leaves_the_model_as_it_was(kwargs, error, message):
    base = make_refusable(tiny_llama())
    before = model_state(base)
    with pytest.raises(error, match=message):
        get_peft_model(base, SparsePeftConfig(salience="magnitude", **kwargs))
    assert_same_state(base, before)


@pytest.mark.parametrize(("kwargs", "error", "message"), REFUSED_INJECTIONS)
def test_a_refused_add_adapter_leaves_the_other_adapters_as_they_were(kwargs, error, message):
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, density=0.1, salience="magnitude"))
    make_refusable(model.base_model.model)
    before = model_state(model)
    with pytest.raises(error, match=message):
        model.add_adapter("other", SparsePeftConfig(salience="magnitude", **kwargs))
    assert_same_state(model, before)
    assert list(model.peft_config) == ["default"]
    assert all(list(layer.speft_values) == ["default"] for layer in sparse_layers(model).values())


def test_uncalibrated_adapter_refuses_training_and_saving(tmp_path):
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, density=0.1, salience="gradient"))
    ids = torch.randint(0, 64, (2, 8))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # inference of an uncalibrated adapter is the base model
    model.train()
    with pytest.raises(RuntimeError, match="hf_speft.calibrate"):
        model(input_ids=ids, labels=ids)
    with pytest.raises(RuntimeError, match="no mask yet"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()  # refused before peft creates the folder or its README


@pytest.fixture
def saved_adapter(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, density=0.1, salience="magnitude",
                                                          init_weights=False))
    model.save_pretrained(tmp_path)
    return tmp_path


def corrupt(path, mutate):
    tensors = load_file(path / "adapter_model.safetensors")
    mutate(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def first_key(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _unsorted(t):
    key = first_key(t, "speft_indices")
    t[key] = t[key].flip(0).contiguous()


def _repeated(t):
    key = first_key(t, "speft_indices")
    t[key] = t[key].clone()
    t[key][1] = t[key][0]


def _out_of_range(t):
    key = first_key(t, "speft_indices")
    t[key] = t[key].clone()
    t[key][-1] = 10**6


def _missing(t):
    del t[first_key(t, "speft_values")]


def _short_values(t):
    key = first_key(t, "speft_values")
    t[key] = t[key][:-1].contiguous()


def _nan_values(t):
    key = first_key(t, "speft_values")
    t[key] = t[key].clone()
    t[key][0] = float("nan")


def _float_indices(t):
    key = first_key(t, "speft_indices")
    t[key] = t[key].float()


def _wrong_shape(t):
    t[first_key(t, "speft_weight_shape")] = torch.tensor([7, 7])


def _stray_module(t):
    key = first_key(t, "speft_values")
    t[key.replace("layers.0", "layers.9")] = t[key].clone()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_unsorted, "not strictly increasing"),
        (_repeated, "not strictly increasing"),
        (_out_of_range, "out of range"),
        (_missing, "has no speft_values"),
        (_short_values, "values for"),
        (_nan_values, "NaN"),
        (_float_indices, "int32/int64"),
        (_wrong_shape, "saved for a"),
        (_stray_module, "does not target"),
    ],
)
def test_corrupted_file_raises_and_leaves_model_untouched(saved_adapter, mutate, message):
    corrupt(saved_adapter, mutate)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, density=0.1, salience="magnitude"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptAdapterError, match=message):
        model.load_adapter(saved_adapter, adapter_name="loaded")
    assert set(model.state_dict()) == set(before)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert "loaded" not in model.peft_config
    assert all("loaded" not in layer.speft_values for layer in sparse_layers(model).values())


def test_adapter_on_a_different_base_model(saved_adapter):
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]
    (saved_adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptAdapterError, match="different"):
        PeftModel.from_pretrained(tiny_gpt2(), saved_adapter)


def damage_bytes(file, key, fill=b"\xff"):
    """Overwrite the stored bytes of one tensor in place (0xFF bytes are NaN in float32), as a damaged disk would."""
    raw = file.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + header_size])[key]["data_offsets"]
    start = 8 + header_size + begin
    file.write_bytes(raw[:start] + fill * (end - begin) + raw[start + end - begin:])


def test_a_file_damaged_on_disk_is_refused_by_every_reader(saved_adapter, tmp_path, capsys):
    from hf_speft_cli import main

    base = tmp_path / "base"
    torch.manual_seed(0)
    tiny_llama().save_pretrained(base)
    weights = saved_adapter / "adapter_model.safetensors"
    damage_bytes(weights, first_key(load_file(weights), "speft_values"))
    with pytest.raises(CorruptAdapterError, match="NaN"):
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)
    for command in (["inspect", str(saved_adapter)], ["merge", str(base), str(saved_adapter), str(tmp_path / "out")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "NaN" in err and str(weights) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out")]  # nor a staging folder


def test_a_truncated_file_is_refused_naming_it_and_leaves_nothing_registered(saved_adapter):
    weights = saved_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), SparsePeftConfig(target_modules=TARGETS, density=0.1, salience="magnitude"))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CorruptAdapterError, match=f"Cannot read the adapter file {weights}"):
        model.load_adapter(saved_adapter, adapter_name="bad")
    assert list(model.peft_config) == ["default"]
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(CorruptAdapterError, match=str(weights)):
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)


def test_a_failed_from_pretrained_leaves_the_base_model_as_it_was(saved_adapter):
    from peft.tuners.tuners_utils import BaseTunerLayer

    corrupt(saved_adapter, _out_of_range)
    torch.manual_seed(0)
    base = tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = base(input_ids=ids).logits
    state = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(CorruptAdapterError, match="out of range"):
        PeftModel.from_pretrained(base, saved_adapter)
    assert not any(isinstance(module, BaseTunerLayer) for module in base.modules())
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[key], value) for key, value in state.items())
    torch.testing.assert_close(base(input_ids=ids).logits, expected, rtol=0, atol=0)
