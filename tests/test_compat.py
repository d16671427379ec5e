"""`hf_speft.integrations.compat`, the one home of hf-speft's reliances on other libraries' internals.

One contract test per entry of `compat.RELIANCES` (`test_contract_<entry>`): each checks that the upstream behaviour
the entry relies on still holds and fails naming the upstream change. Then the tuner hooks SPEFT overrides still exist
with the parameters it relies on, and a scan of `hf_speft/`, `hf_speft_cli/` and `recipes/` refuses any private name
of peft, transformers, trl, bitsandbytes, deepspeed or accelerate outside the compat module.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from testing_common import tiny_gpt2, tiny_llama
from torch import nn

import hf_speft
from hf_speft import SparsePeftConfig
from hf_speft.integrations import compat

ROOT = Path(__file__).parents[1]
COMPAT = ROOT / "hf_speft" / "integrations" / "compat.py"
UPSTREAM = ("peft", "transformers", "trl", "bitsandbytes", "deepspeed", "accelerate")
# torch internals are outside this scope (torch is not one of the libraries above): the ones the package reads.
TORCH_PRIVATE = {"_cdata", "_indices", "_values", "_version", "_register_load_state_dict_pre_hook"}
OTHER_MODULES = {"argparse", "torch"}  # `argparse._SubParsersAction` in annotations is the standard library's


def contract(holds: bool, change: str) -> None:
    assert holds, f"{change}; update hf_speft/integrations/compat.py (and its row in docs/development.md)"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


# ---------------------------------------------------------------------------------------------------- the registry
def test_every_entry_has_a_contract_test_and_a_docs_row():
    docs = (ROOT / "docs" / "development.md").read_text()
    for entry in compat.RELIANCES:
        assert hasattr(compat, entry), entry
        assert f"test_contract_{entry}" in globals(), f"no contract test for compat.{entry}"
        assert f"| `{entry}` |" in docs, f"docs/development.md has no row for compat.{entry}"


# ---------------------------------------------------------------------------------------------------- peft
def test_contract_BufferDict():
    module = nn.Module()
    module.buffers_ = compat.BufferDict({}, persistent=True)
    module.buffers_["default"] = torch.arange(3)
    contract(module.state_dict().keys() == {"buffers_.default"} and torch.equal(
        module.state_dict()["buffers_.default"], torch.arange(3)),
        "peft's BufferDict (peft.tuners._buffer_dict) no longer saves persistent buffers under '<name>.<key>'")


def test_contract_in_out_features():
    from transformers.pytorch_utils import Conv1D

    contract(compat.in_out_features(nn.Linear(3, 5)) == (3, 5) and compat.in_out_features(Conv1D(5, 3)) == (3, 5),
             "peft changed _get_in_out_features (peft.tuners.tuners_utils): (in, out) of Linear / Conv1D")


def test_contract_move_adapter_to_base_layer():
    model = get_peft_model(MLP(), SparsePeftConfig(target_modules=["lin0"], density=0.1, salience="magnitude"))
    layer = model.base_model.model.lin0
    layer.base_layer.to(torch.bfloat16)
    compat.move_adapter_to_base_layer(layer, "default")
    contract(layer.speft_values["default"].dtype == torch.bfloat16
             and layer.speft_indices["default"].dtype in (torch.int32, torch.int64)
             and layer.speft_weight_shape["default"].dtype == torch.int64,
             "peft changed _move_adapter_to_device_of_base_layer (BaseTunerLayer): an adapter's float tensors take "
             "the base layer's dtype, integer ones keep theirs")


def test_contract_replace_module():
    from hf_speft.layer import Linear

    model = get_peft_model(MLP(), SparsePeftConfig(target_modules=["lin0"], density=0.1, salience="magnitude"))
    parent = model.base_model.model
    child = parent.lin1
    new = Linear(child, "default", model.peft_config["default"])
    compat.replace_module(model.base_model, parent, "lin1", new, child)
    contract(parent.lin1 is new and new.get_base_layer() is child,
             "peft changed BaseTuner._replace_module: it no longer puts the new layer in place of the old one")


def test_contract_extend_peft_type():
    from peft.utils.peft_types import PeftType

    member = hf_speft.SPEFT_PEFT_TYPE
    contract(PeftType("SPEFT") is member and PeftType["SPEFT"] is member and member in list(PeftType)
             and member == "SPEFT" and member.value == "SPEFT" and compat.extend_peft_type("SPEFT") is member,
             "Python's enum or peft's PeftType changed how members are stored (_member_map_, _value2member_map_, "
             "_member_names_)")


def test_contract_enable_mixed_tuner():
    import peft.mixed_model
    from peft.tuners.mixed import model as mixed

    from hf_speft.integrations.mixed import SpeftMixedModel

    contract(hf_speft.SPEFT_PEFT_TYPE in mixed.COMPATIBLE_TUNER_TYPES and "speft_" in mixed.PREFIXES
             and hf_speft.SparsePeftLayer in mixed.Layers and peft.mixed_model.MixedModel is SpeftMixedModel,
             "peft renamed the module globals of peft.tuners.mixed.model (COMPATIBLE_TUNER_TYPES, PREFIXES, Layers)")
    model = get_peft_model(MLP(), SparsePeftConfig(target_modules=["lin0"], density=0.1), mixed=True)
    contract(type(model.base_model) is SpeftMixedModel,
             "peft's PeftMixedModel no longer builds peft.mixed_model.MixedModel")


def lora_model():
    torch.manual_seed(0)
    return get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], r=2))


def printed(function, *args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        function(*args)
    return out.getvalue()


def test_contract_rebind_peft_model_methods(tmp_path):
    """For a model without SPEFT adapters the rebound methods are peft's: same output, same files, same errors."""
    peft_save, peft_show = PeftModel.save_pretrained.__wrapped__, PeftModel.print_trainable_parameters.__wrapped__
    contract({"save_directory", "selected_adapters", "is_main_process"} <= set(inspect.signature(peft_save).parameters),
             "peft's PeftModel.save_pretrained lost its `save_directory`, `selected_adapters` or `is_main_process` "
             "parameter")
    model = lora_model()
    assert printed(model.print_trainable_parameters) == printed(peft_show, model)
    assert printed(model.print_trainable_parameters).startswith("trainable params: 60 ")  # r * (10 + 20)
    model.save_pretrained(tmp_path / "ours")
    peft_save(model, tmp_path / "peft")
    ours = sorted(path.relative_to(tmp_path / "ours") for path in (tmp_path / "ours").rglob("*"))
    assert ours == sorted(path.relative_to(tmp_path / "peft") for path in (tmp_path / "peft").rglob("*"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {str(path) for path in ours}
    for path in ours:
        assert (tmp_path / "ours" / path).read_bytes() == (tmp_path / "peft" / path).read_bytes(), path
    with pytest.raises(ValueError) as ours_error:
        model.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])
    with pytest.raises(ValueError) as peft_error:
        peft_save(model, tmp_path / "bad", selected_adapters=["nope"])
    assert str(ours_error.value) == str(peft_error.value)


def test_rebound_methods_serve_an_uncalibrated_speft_adapter(tmp_path):
    model = get_peft_model(MLP(), SparsePeftConfig(target_modules=["lin0"], density=0.1, salience="gradient"))
    lines = printed(model.print_trainable_parameters).splitlines()
    assert lines[0] == printed(PeftModel.print_trainable_parameters.__wrapped__, model).strip()
    assert lines[1] == ("SPEFT adapter 'default' is not calibrated yet: its mask will train 20 weights once "
                        "`hf_speft.calibrate` (or SpeftTrainer) runs")
    with pytest.raises(RuntimeError, match="has no mask yet"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before peft creates the folder


# ---------------------------------------------------------------------------------------------------- transformers
def test_contract_calibration_dataloader(tmp_path):
    from trainer_helpers import counting_dataset, training_args
    from transformers import Trainer, default_data_collator

    parameters = list(inspect.signature(Trainer._get_dataloader).parameters)
    contract({"dataset", "description", "batch_size", "sampler_fn", "is_training"} <= set(parameters),
             f"transformers changed Trainer._get_dataloader's parameters (now {parameters})")
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, per_device_train_batch_size=3),
                      train_dataset=counting_dataset(8), data_collator=default_data_collator)
    contract(getattr(trainer, "_train_batch_size", None) == 3 and callable(getattr(trainer, "_get_train_sampler", 0)),
             "transformers renamed Trainer._train_batch_size or Trainer._get_train_sampler")
    calibration = counting_dataset(7, seed=1)
    rows = [batch["input_ids"].shape[0] for batch in compat.calibration_dataloader(trainer, calibration)]
    assert rows == [3, 3]  # the trainer's batch size, drop_last as in training
    seen = sorted(row for batch in compat.calibration_dataloader(trainer, calibration)
                  for row in batch["input_ids"].tolist())
    assert all(row in calibration["input_ids"] for row in seen)


def test_contract_model_class():
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                              LlamaForCausalLM, LlamaForSequenceClassification)

    config = LlamaConfig()
    contract(compat.model_class(AutoModelForCausalLM, config) is LlamaForCausalLM
             and compat.model_class(AutoModelForSequenceClassification, config) is LlamaForSequenceClassification,
             "transformers changed _get_model_class / _BaseAutoModelClass._model_mapping (models/auto/auto_factory)")


def test_contract_loss_shifts_labels():
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    model = tiny_llama()
    contract(LOSS_MAPPING.get(model.loss_type) is ForCausalLMLoss and model.loss_function is ForCausalLMLoss,
             f"transformers no longer maps a causal LM's loss_type {model.loss_type!r} to ForCausalLMLoss")
    gpt2 = tiny_gpt2()
    contract(gpt2.loss_type not in LOSS_MAPPING and gpt2.loss_function is ForCausalLMLoss,
             "transformers no longer falls back to ForCausalLMLoss for a loss_type it does not know")
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    shifted = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    contract(torch.allclose(ForCausalLMLoss(logits, labels, vocab_size=7), shifted),
             "transformers' ForCausalLMLoss no longer drops each row's first label")
    assert compat.loss_shifts_labels(model) and compat.loss_shifts_labels(gpt2)


def test_contract_set_attention_name():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("speft_flash_like_test", counting)
    model = tiny_llama()
    compat.set_attention_name(model, "speft_flash_like_test")
    model(torch.zeros(1, 4, dtype=torch.long))
    contract(len(calls) == model.config.num_hidden_layers,
             "transformers' attention layers no longer read config._attn_implementation at each forward")


# ---------------------------------------------------------------------------------------------------- bitsandbytes
def packed_4bit_weight():
    """A real 4-bit weight in bitsandbytes' packed CPU layout (packed by hand, so on any CPU)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
    standard = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    return weight, standard


def test_contract_is_cpu_packed():
    weight, _ = packed_4bit_weight()
    contract(compat.is_cpu_packed(weight),
             "bitsandbytes no longer marks a packed CPU weight by quant_state.packing_format_for_cpu")
    assert not compat.is_cpu_packed(torch.zeros(2)) and not compat.is_cpu_packed(nn.Linear(2, 2).weight)


def test_contract_standard_layout_copy():
    import bitsandbytes as bnb

    weight, standard = packed_4bit_weight()
    before = weight.data.clone()
    data, state = compat.standard_layout_copy(weight)
    restored = bnb.functional.dequantize_4bit(data, state)
    contract(restored.shape == standard.shape and torch.allclose(restored, standard, rtol=1e-2, atol=1e-2),
             "bitsandbytes changed _convert_weight_packed_for_cpu_inverse or the packed quant_state "
             "(original_nested, original_dtype)")
    assert torch.equal(weight.data, before)  # the layer's own weight is untouched


# ---------------------------------------------------------------------------------------------------- deepspeed
def test_contract_is_partitioned():
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    plain, marked = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    marked.ds_id = 0
    contract(is_zero_param(marked) and not is_zero_param(plain),
             "DeepSpeed no longer marks ZeRO-3 parameters by `ds_id`")
    assert compat.is_partitioned(marked) and not compat.is_partitioned(plain)


def test_contract_has_call_hooks():
    from accelerate.hooks import ModelHook, add_hook_to_module

    for register in (lambda m: m.register_forward_hook(lambda *a: None),
                     lambda m: m.register_forward_pre_hook(lambda *a: None),
                     lambda m: m.register_full_backward_hook(lambda *a: None),
                     lambda m: m.register_full_backward_pre_hook(lambda *a: None),
                     lambda m: nn.modules.module.register_module_forward_hook(lambda *a: None),
                     lambda m: nn.modules.module.register_module_forward_pre_hook(lambda *a: None)):
        module = nn.Linear(2, 2)
        assert not compat.has_call_hooks(module)
        handle = register(module)
        contract(compat.has_call_hooks(module), "torch moved the dicts that hold a module's or the global hooks")
        handle.remove()
        assert not compat.has_call_hooks(module)
    module = nn.Linear(2, 2)
    add_hook_to_module(module, ModelHook())
    contract(compat.has_call_hooks(module), "accelerate no longer marks hooked modules with `_hf_hook`")


# ---------------------------------------------------------------------------------------------------- tuner hooks
def hook_parameters(owner: type, name: str) -> list[str]:
    function = inspect.getattr_static(owner, name)
    function = function.__func__ if isinstance(function, (classmethod, staticmethod)) else function
    names = list(inspect.signature(function).parameters)
    return names[1:] if names and names[0] in ("self", "cls") else names


@pytest.mark.parametrize("hook", list(compat.TUNER_HOOKS))
def test_tuner_hooks_we_override_still_exist(hook):
    from peft.tuners.mixed.model import MixedModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    owners = {"BaseTuner": BaseTuner, "BaseTunerLayer": BaseTunerLayer, "MixedModel": MixedModel,
              "PeftModel": PeftModel}
    owner_name, name = hook.split(".")
    owner = owners[owner_name]
    contract(hasattr(owner, name), f"peft removed or renamed the tuner hook {hook}")
    expected = compat.TUNER_HOOKS[hook]
    if expected is not None:
        actual = hook_parameters(owner, name)
        contract(actual[:len(expected)] == list(expected),
                 f"peft changed the parameters of {hook}: {actual}, SPEFT relies on {list(expected)}")


def test_peft_enters_the_tuners_forward_hooks():
    model = get_peft_model(MLP(), SparsePeftConfig(target_modules=["lin0"], density=0.1)).eval()
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(torch.zeros(2, 10), adapter_names=["default", "nope"])


# ---------------------------------------------------------------------------------------------------- the scan
def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name != "_"


def upstream_members() -> set[str]:
    """The private members of the upstream classes the package extends (beyond nn.Module's and object's)."""
    from peft.tuners.mixed.model import MixedModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from transformers import PretrainedConfig, PreTrainedModel, Trainer
    from trl import SFTTrainer

    torch_names = set(dir(nn.Module)) | set(dir(object))
    return {name for cls in (BaseTuner, BaseTunerLayer, MixedModel, PeftModel, Trainer, SFTTrainer, PreTrainedModel,
                             PretrainedConfig)
            for name in dir(cls) if is_private(name) and name not in torch_names}


def own_names(trees) -> set[str]:
    """Names the package itself defines: modules, functions, classes, arguments, assigned names and attributes."""
    names = {path.stem for folder in SCANNED for path in (ROOT / folder).rglob("*.py")}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return names


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def violations(tree: ast.AST, own: set[str], upstream: set[str]) -> list[str]:
    """Uses of upstream internals in one module: private imports from the libraries, private attributes that are
    upstream's (or not the package's own), and the names `compat.RELIANCES` owns."""
    hooks = {hook.split(".")[1] for hook in compat.TUNER_HOOKS}
    owned = {name for names in compat.RELIANCES.values() for name in names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            imported = [] if isinstance(node, ast.Import) else [alias.name for alias in node.names]
            for module in modules:
                if not node.__dict__.get("level") and module.split(".")[0] in UPSTREAM:
                    parts = module.split(".") + imported
                    if any(is_private(part) or part in owned for part in parts):
                        found.append(f"line {node.lineno}: import of {module} {imported}")
        elif isinstance(node, ast.Attribute):
            name = node.attr
            if dotted(node).split(".", 1)[-1] in owned or dotted(node) in owned or name in owned:
                found.append(f"line {node.lineno}: {dotted(node)}")
            elif is_private(name) and name not in hooks and name not in TORCH_PRIVATE and (
                    name in upstream or name not in own) and dotted(node).split(".")[0] not in OTHER_MODULES:
                found.append(f"line {node.lineno}: .{name}")
        elif isinstance(node, ast.Name) and node.id in owned:
            found.append(f"line {node.lineno}: {node.id}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
            if name in owned or (is_private(name) and name not in TORCH_PRIVATE and (name in upstream
                                                                                      or name not in own)):
                found.append(f"line {node.lineno}: {node.func.id}(..., {name!r})")
    return found


SCANNED = ("hf_speft", "hf_speft_cli", "recipes")


def package_trees() -> dict[Path, ast.AST]:
    paths = [path for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))]
    return {path: ast.parse(path.read_text()) for path in paths}


def test_no_upstream_internals_outside_the_compat_module():
    trees = package_trees()
    own, upstream = own_names(trees.values()), upstream_members()
    found = {str(path.relative_to(ROOT)): hits for path, tree in trees.items() if path != COMPAT
             if (hits := violations(tree, own, upstream))}
    assert not found, (f"upstream internals used outside hf_speft/integrations/compat.py: {found}; move each into "
                       "an entry there (with its contract test and docs row)")


@pytest.mark.parametrize("snippet", [
    "from peft.utils.other import _freeze_adapter",
    "from peft.tuners._buffer_dict import BufferDict",
    "def f(trainer):\n    return trainer._get_dataloader",
    "def f(weight):\n    return hasattr(weight, 'ds_id')",
    "from transformers.loss.loss_utils import LOSS_MAPPING",
    "def f(model):\n    model.config._attn_implementation = 'eager'",
    "def f(self):\n    self._train_batch_size = 1",
    "import peft.mixed_model\npeft.mixed_model.MixedModel = object",
    "from peft import PeftModel\nPeftModel.save_pretrained = print",
    "class L:\n    def update_layer(self, name):\n        self._move_adapter_to_device_of_base_layer(name)",
    "class T:\n    def f(self, *a):\n        self._replace_module(*a)",
])
def test_the_scan_finds_each_kind_of_reliance(snippet):
    trees = package_trees()
    tree = ast.parse(snippet)
    assert violations(tree, own_names([*trees.values(), tree]), upstream_members()), snippet


def test_the_scan_allows_tuner_hooks_and_own_private_names():
    snippet = ("class T:\n    def _create_and_replace(self, *a):\n        return super()._create_and_replace(*a)\n"
               "    def _own_helper(self):\n        return self._own_helper\n")
    tree = ast.parse(snippet)
    assert violations(tree, own_names([tree]), upstream_members()) == []


# --------------------------------------------------------------------------------------------------------- torch
def test_contract_is_view():
    storage = torch.zeros(4, 3)
    for view in (storage[1:], storage.t(), storage.reshape(12), storage.transpose(0, 1).contiguous().t()):
        contract(compat.is_view(view), "torch no longer marks views with Tensor._is_view()")
    for fresh in (storage, storage.t().contiguous(), storage * 2):
        contract(not compat.is_view(fresh), "torch's Tensor._is_view() is true for a tensor that owns its storage")


# ---------------------------------------------------------------------------------------------------- accelerate
def test_contract_has_accelerate_hook():
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model = cpu_offload(MLP(), execution_device="cpu")
    contract(compat.has_accelerate_hook(model.lin0) and not compat.has_accelerate_hook(nn.Linear(2, 2)),
             "accelerate no longer marks hooked modules with `_hf_hook` (accelerate.hooks.add_hook_to_module)")
    remove_hook_from_module(model.lin0)
    contract(not compat.has_accelerate_hook(model.lin0),
             "accelerate's remove_hook_from_module no longer removes `_hf_hook`")
