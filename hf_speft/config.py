"""`SparsePeftConfig`: the fields of a SPEFT adapter, their validation and the budget arithmetic."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ._registry import SPEFT_PEFT_TYPE
from .kernels import KERNELS
from .kernels.choice import check_kernel
from .measures import available_measures, measure_info

MASK_SCOPES = ("global", "local")
# salience=None resolves by task: benchmarks/quality_lm.py found magnitude ahead of gradient on a causal LM (GSM8K,
# held-out NLL over 3 seeds, each at its swept rate); the gradient default of every other task is the paper's.
DEFAULT_SALIENCE = {"CAUSAL_LM": "magnitude"}
DEFAULT_SALIENCE_OTHERWISE = "gradient"
SALIENCE_DTYPES = ("float32", "bfloat16")
MASK_UPDATES = ("static", "dynamic")
OPTIMIZER_RESETS = ("new", "all")
FOLD_CHOICES = (True, False, "auto")
DEFAULT_LORA_RANK = 8  # the budget when none is given: as many weights as peft's default LoRA (r=8) trains


def check_positive_int(name: str, value: object, meaning: str = "", allow_none: bool = False) -> None:
    """A one-line ValueError unless `value` is a positive int (bools are not counts), or None where allowed."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        unit = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name}={value!r} is not allowed; it must be a positive integer{unit}"
                         f"{' or None' if allow_none else ''}.")


@dataclass
class SparsePeftConfig(PeftConfig):
    """Configuration of a salience-aware sparse delta (SPEFT): θ = θ0 + θ_sp, θ_sp trained only on a top-ρ mask.

    Args:
        target_modules: Module names (list: exact or suffix match) or a regex (str) to adapt; `"all-linear"` adapts
            every linear layer except the output head. None uses peft's default targets for the architecture.
        exclude_modules: Module names or a regex never to adapt.
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g. a classifier head).
        layers_to_transform: Layer indices to adapt (with `layers_pattern`), as in peft's LoRA.
        layers_pattern: Name of the layer container (e.g. `"layers"`) used with `layers_to_transform`.
        density: Fraction of all targeted weights to train, 0 < density <= 1.
        num_params: Exact number of weights to train.
        match_lora_rank: Train as many weights as a LoRA of this rank would on the same targets (Σ r·(m+n)).
            Exactly one of `density`, `num_params` and `match_lora_rank` is set; with none given the budget is
            `match_lora_rank=8`, the size of peft's default `LoraConfig` (r=8), so `target_modules` alone is a
            working config.
        mask_scope: `"global"` ranks all targeted weights together; `"local"` gives every layer the same density.
        salience: Name of the measure that scores weights (see `hf_speft.available_measures()`). Data-free measures
            (`"magnitude"`, `"random"`, `"synflow"`) build the mask inside `get_peft_model`; the others leave the
            adapter uncalibrated until `hf_speft.calibrate(model, dataloader)` runs. None (default) picks by
            `task_type`: `"magnitude"` for `"CAUSAL_LM"` (it learned more and forgot less than gradient salience on
            SmolLM2-135M GSM8K, benchmarks/quality_lm.py), `"gradient"` (the paper's best) for every other task.
        salience_batches: Number of batches used by data-dependent measures (the paper: 64 batches of 16 samples).
        salience_dtype: Dtype the scores accumulate in, `"float32"` or `"bfloat16"`.
        salience_device: Device the scores accumulate on (e.g. `"cpu"` to offload); None keeps each weight's device.
        salience_groups: Score the targets in this many groups of consecutive layers, one pass over the salience
            batches each: peak salience memory holds one group's scores instead of all, for `groups`× the time. The
            masks are the same as with one group. Not for `"grasp"` and `"force"`, whose scores couple all layers.
        salience_micro_batch_size: Back-propagate each salience batch in micro-batches of this many rows (None: the
            whole batch): the activations of a salience pass shrink to a micro-batch's for the same scores (each
            micro-batch's loss is weighted by its share of the batch's label tokens or rows).
        init_weights: True starts from a zero delta (model output unchanged); False draws a random nonzero delta
            (for tests, as peft tuners do).
        seed: Seed of the random measure and of `init_weights=False`.
        mask_update: `"static"` (the paper's default and winner) computes the mask once; `"dynamic"` recomputes
            salience every `update_interval` optimizer steps and moves each layer's entries to its new top ones (each
            layer keeps its count), leaving the model's function unchanged (see `SpeftTrainer`).
        update_interval: Optimizer steps between dynamic mask updates.
        reset_optimizer: On a dynamic update, `"new"` zeroes the optimizer state of entries new to the mask and keeps
            it for entries that stay; `"all"` resets every entry's state (as in the paper).
        fold_weights: How the delta reaches the base product. `"auto"` (default) folds it: W0+Δ is written into the
            frozen base weight only while the layer's own base GEMM runs (forward, and the input-gradient GEMM in
            backward) and W0 written back right after, so a forward costs the base GEMM alone and every reader sees
            W0 at all other times. bf16/fp16 bases compute with round_to_base_dtype(W0 + values) from the saved W0
            entries, as a bf16 merge of the adapter (and AMP's copy of fp32 master weights) does; the values stay
            float32 and get the exact gradient gᵀx at the mask. `"auto"` runs unfolded (base output plus a sparse
            correction) with several active adapters, bases with hooks (accelerate offload), sharded (ZeRO-3, FSDP)
            or meta weights, and under `torch.compile` traces. On a bitsandbytes 8-bit/4-bit base, True and "auto"
            select the transient merge instead, which writes nothing into the base (`hf_speft.quantized`). True
            folds or raises naming why it cannot; False never folds. Hybrid mode folds its sparse part and adds the
            low-rank part as LoRA does.
        lora_r: Hybrid mode (sparse + low-rank, as in RoSA): with `lora_r > 0` every target also trains a rank-`lora_r`
            pair B·A in the same adapter. The budget (`density`, `num_params` or `match_lora_rank`) counts both parts:
            the low-rank part takes exactly Σ lora_r·(m+n) weights, the sparse mask gets the rest. 0: sparse only.
        lora_alpha: Scaling numerator of the low-rank part (its output is scaled by `lora_alpha / lora_r`).
        lora_dropout: Dropout on the low-rank part's input.
        saved_masks: True in a saved adapter's config (every saved config says so; `from_pretrained` sets it for
            older files too) and in a composed one: the masks come with the checkpoint, so injecting the config
            builds none and needs no salience measure. Injected without a checkpoint, such an adapter stays
            uncalibrated until `hf_speft.calibrate` (or `SpeftTrainer`) builds its masks. False (a new config):
            injection builds the masks of a data-free measure right away.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (list) or regex (str) to adapt; 'all-linear' for all linear layers."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (list) or regex (str) never to adapt."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a classifier)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt (used with layers_pattern)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer container, e.g. 'layers', for layers_to_transform."}
    )
    density: Optional[float] = field(
        default=None, metadata={"help": "Fraction of the targeted weights to train, 0 < density <= 1."}
    )
    num_params: Optional[int] = field(default=None, metadata={"help": "Exact number of weights to train."})
    match_lora_rank: Optional[int] = field(
        default=None,
        metadata={"help": "Train as many weights as a LoRA of this rank on the same targets (8 if no budget is set)."},
    )
    mask_scope: Literal["global", "local"] = field(
        default="global",
        metadata={"help": "'global': one ranking across all targets; 'local': same density per layer."},
    )
    salience: Optional[str] = field(
        default=None, metadata={"help": "Salience measure that scores weights, e.g. 'gradient', 'magnitude'; default: "
                                        "'magnitude' for task_type CAUSAL_LM, else 'gradient'."}
    )
    salience_batches: int = field(default=64, metadata={"help": "Batches used by data-dependent salience measures."})
    salience_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "Dtype the salience scores accumulate in."}
    )
    salience_device: Optional[str] = field(
        default=None, metadata={"help": "Device the salience scores accumulate on ('cpu' to offload)."}
    )
    salience_groups: int = field(
        default=1, metadata={"help": "Score the targets in this many groups of layers (less memory, more passes)."}
    )
    salience_micro_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Back-propagate salience batches in micro-batches of this many rows."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: zero delta at start; False: random nonzero delta (for tests)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random measure and of init_weights=False."})
    mask_update: Literal["static", "dynamic"] = field(
        default="static", metadata={"help": "'static': one mask; 'dynamic': recompute every update_interval steps."}
    )
    update_interval: int = field(default=100, metadata={"help": "Optimizer steps between dynamic mask updates."})
    reset_optimizer: Literal["new", "all"] = field(
        default="new", metadata={"help": "Dynamic updates reset optimizer state of 'new' entries only, or of 'all'."}
    )
    fold_weights: Union[bool, Literal["auto"]] = field(
        default="auto", metadata={"help": "'auto': fold the delta into the frozen base weight only while the layer's "
                                            "own GEMMs run (bf16/fp16 bases: a bf16 merge's numerics), unfolded where "
                                            "folding does not apply, a transient merge on bitsandbytes bases; "
                                            "True: fold or raise; False: never fold."}
    )
    lora_r: int = field(
        default=0, metadata={"help": "Hybrid mode: rank of a low-rank pair trained beside the sparse delta (0: none)."}
    )
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator of the hybrid low-rank part."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the hybrid low-rank part's input."})
    kernel: str = field(
        default="auto",
        metadata={"help": f"Sparse kernel strategy, one of {KERNELS}; 'auto' measures and keeps the fastest per "
                          "shape."},
    )
    saved_masks: bool = field(
        default=False,
        metadata={"help": "True in a saved adapter's config: its checkpoint holds the masks, so injecting it builds "
                          "none (no salience runs)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SPEFT_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (regex).")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        self._validate_budget()
        if self.mask_scope not in MASK_SCOPES:
            raise ValueError(f"mask_scope={self.mask_scope!r} is not allowed; use one of {MASK_SCOPES}.")
        if self.salience is None:
            task = getattr(self.task_type, "value", self.task_type)
            self.salience = DEFAULT_SALIENCE.get(task, DEFAULT_SALIENCE_OTHERWISE)
        if not isinstance(self.salience, str) or not self.salience:
            raise ValueError(f"salience={self.salience!r} must be the name of a salience measure.")
        check_positive_int("salience_batches", self.salience_batches)
        if self.salience_dtype not in SALIENCE_DTYPES:
            raise ValueError(f"salience_dtype={self.salience_dtype!r} is not allowed; use one of {SALIENCE_DTYPES}.")
        check_positive_int("salience_groups", self.salience_groups)
        check_positive_int("salience_micro_batch_size", self.salience_micro_batch_size, "rows per micro-batch",
                           allow_none=True)
        if self.mask_update not in MASK_UPDATES:
            raise ValueError(f"mask_update={self.mask_update!r} is not allowed; use one of {MASK_UPDATES}.")
        check_positive_int("update_interval", self.update_interval, "optimizer steps")
        if self.reset_optimizer not in OPTIMIZER_RESETS:
            raise ValueError(f"reset_optimizer={self.reset_optimizer!r} is not allowed; use one of {OPTIMIZER_RESETS}.")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer.")
        if self.fold_weights not in FOLD_CHOICES or not isinstance(self.fold_weights, (bool, str)):
            raise ValueError(f"fold_weights={self.fold_weights!r} is not allowed; use one of {FOLD_CHOICES}.")
        self._validate_low_rank()
        check_kernel(self.kernel)

    def check_salience(self) -> None:
        """A one-line ValueError unless `salience` names a registered measure that suits `salience_groups`.

        Checked where a mask is built (injecting a config without saved masks, `calibrate`, dynamic updates), not
        when a config is built or loaded: a saved adapter's masks come with it, so it loads in a process that never
        registered the measure it was trained with."""
        measures = available_measures()
        if self.salience not in measures:
            raise ValueError(
                f"salience={self.salience!r} is not a registered measure; use one of {sorted(measures)} "
                "(custom measures must be registered with hf_speft.register_salience before a mask is built)."
            )
        if self.salience_groups > 1 and measure_info(self.salience).couples_layers:
            raise ValueError(
                f"salience={self.salience!r} scores all layers together, so salience_groups must be 1 (got "
                f"{self.salience_groups}); measures that score each layer alone can be grouped."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """peft's loader (used by `PeftModel.from_pretrained` and `load_adapter`). The config it returns has
        `saved_masks=True` (also for files saved before that field existed): injecting it builds no mask."""
        from .checkpoint import check_readable

        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):  # a damaged weights file is refused before peft changes the model
            check_readable(folder)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.saved_masks = True
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's config save, with `saved_masks=True` in the file (a config is saved with its adapter's masks; the
        config in memory is left as it is)."""
        saved = copy.copy(self)
        saved.saved_masks = True
        super(SparsePeftConfig, saved).save_pretrained(save_directory, **kwargs)

    def _validate_budget(self) -> None:
        given = {
            name: value
            for name, value in (
                ("density", self.density),
                ("num_params", self.num_params),
                ("match_lora_rank", self.match_lora_rank),
            )
            if value is not None
        }
        if not given:
            self.match_lora_rank = DEFAULT_LORA_RANK
        elif len(given) > 1:
            raise ValueError(
                "Set at most one budget of `density` (0 < d <= 1), `num_params` (a count) or `match_lora_rank` "
                f"(a LoRA rank; the default is {DEFAULT_LORA_RANK}); got {given}."
            )
        if self.density is not None and not (
            isinstance(self.density, (int, float)) and not isinstance(self.density, bool) and 0 < self.density <= 1
        ):
            raise ValueError(f"density={self.density!r} is not allowed; it must satisfy 0 < density <= 1.")
        for name in ("num_params", "match_lora_rank"):
            check_positive_int(name, getattr(self, name), allow_none=True)

    def _validate_low_rank(self) -> None:
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r!r} must be a non-negative integer (0: no low-rank part).")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a positive number.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must satisfy 0 <= lora_dropout < 1.")

    def budget_split(self, weight_shapes: list[tuple[int, int]]) -> tuple[int, int]:
        """(sparse, low-rank) numbers of trainable weights across targets of the given (out, in) shapes: the
        low-rank part of hybrid mode (`lora_r`) takes Σ lora_r·(m+n) of the total budget, the mask the rest, which
        must give every target at least one weight (see `hf_speft.masking`)."""
        total = self.total_budget(weight_shapes)
        low_rank = sum(self.lora_r * (out_f + in_f) for out_f, in_f in weight_shapes)
        sparse = total - low_rank
        if sparse < len(weight_shapes):
            raise ValueError(
                f"The sparse part gets {sparse} trainable weights ({total} in all, {low_rank} to the low-rank part "
                f"lora_r={self.lora_r}), but every one of the {len(weight_shapes)} targeted layers trains at least "
                "one; "
                "raise the budget, lower lora_r or target fewer modules."
            )
        return sparse, low_rank

    def total_budget(self, weight_shapes: list[tuple[int, int]]) -> int:
        """Number of weights to train across targets of the given (out_features, in_features) shapes."""
        total = sum(out_features * in_features for out_features, in_features in weight_shapes)
        if self.density is not None:
            count = round(self.density * total)
            source = f"density={self.density}"
        elif self.num_params is not None:
            count = self.num_params
            source = f"num_params={self.num_params}"
        else:
            count = sum(self.match_lora_rank * (out_f + in_f) for out_f, in_f in weight_shapes)
            source = f"match_lora_rank={self.match_lora_rank}"
        if count < 1:
            raise ValueError(f"{source} selects no weight out of the {total} targeted ones; raise the budget.")
        if count > total:
            raise ValueError(
                f"{source} asks for {count} trainable weights but the targeted modules hold only {total}; "
                "lower the budget or target more modules."
            )
        return count
