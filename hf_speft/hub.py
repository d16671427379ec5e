"""What a saved SPEFT adapter holds (`AdapterSummary`, read from its folder alone) and the model card built from it.

peft writes a generic card in `save_pretrained`; once peft has saved, `PeftModel.save_pretrained` (made SPEFT-aware
by `hf_speft.model.adapt_peft_model`) adds the SPEFT tags and sections to it with `update_model_card`, from the model
in memory (`model_summary`: the file just written is not read back). So `save_pretrained`, the Trainer's
checkpoints and `push_to_hub` (this module's, and the Trainer's) carry the card, and `hf-speft inspect` reads the same
summary. (peft's own `model.push_to_hub` uploads the adapter but replaces README.md with transformers' generic card,
for every peft method; `hf_speft.push_to_hub` keeps ours.)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from .checkpoint import (ADAPTER_CONFIG, MASK_ATTRIBUTES, RESIDUAL_ATTRIBUTES, CorruptAdapterError, ModuleDelta,
                         file_deltas, read_weights, weights_file)

CARD_START, CARD_END = "<!-- hf-speft card start -->", "<!-- hf-speft card end -->"
TRAINING_START, TRAINING_END = "<!-- hf-speft training start -->", "<!-- hf-speft training end -->"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32"}


class AdapterFolderError(ValueError):
    """A path that is not a readable SPEFT adapter folder."""


@dataclass
class ModuleSummary:
    """One adapted module of a saved adapter."""

    name: str
    shape: tuple[int, int]
    nnz: int
    residual: int = 0

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])


@dataclass
class AdapterSummary:
    """Everything `hf-speft inspect` and the model card report about a saved adapter."""

    path: str
    config: dict[str, Any]
    modules: list[ModuleSummary]
    dtypes: dict[str, str]
    file_bytes: int
    values_bytes_per_entry: int

    @property
    def nnz(self) -> int:
        return sum(module.nnz for module in self.modules)

    @property
    def targeted(self) -> int:
        return sum(module.shape[0] * module.shape[1] for module in self.modules)

    @property
    def density(self) -> float:
        return self.nnz / self.targeted if self.targeted else 0.0

    @property
    def matched_lora_rank(self) -> float:
        """The LoRA rank with the same trainable count on the same modules: nnz / Σ(m + n)."""
        return self.nnz / sum(module.shape[0] + module.shape[1] for module in self.modules)

    @property
    def dense_delta_bytes(self) -> int:
        return self.targeted * self.values_bytes_per_entry

    @property
    def lora_bytes(self) -> int:
        """File size of a LoRA with the same trainable count, in the same dtype."""
        return self.nnz * self.values_bytes_per_entry

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for module, entry in zip(self.modules, data["modules"]):
            entry["density"] = module.density
        data.update(nnz=self.nnz, targeted=self.targeted, density=self.density,
                    matched_lora_rank=self.matched_lora_rank, dense_delta_bytes=self.dense_delta_bytes,
                    lora_bytes=self.lora_bytes)
        return data


@dataclass
class AdapterFolder:
    """A saved adapter folder, read once and validated: its config, its tensors and each module's delta."""

    path: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    deltas: dict[str, ModuleDelta]

    @property
    def weights_path(self) -> str:
        return weights_file(self.path)


def read_adapter_folder(path: str) -> AdapterFolder:
    """Read an adapter folder (adapter_config.json + adapter_model.safetensors, or the adapter_model.bin of a pickle
    save); its tensors are validated as loading validates them (`hf_speft.checkpoint`). Anything unreadable raises
    `AdapterFolderError` naming it."""
    config_path, weights_path = os.path.join(path, ADAPTER_CONFIG), weights_file(path)
    for required in (config_path, weights_path):
        if not os.path.isfile(required):
            raise AdapterFolderError(
                f"{path!r} is not a saved adapter folder: {os.path.basename(required)} is missing.")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFolderError(f"Cannot read the adapter in {path!r}: {error}") from None
    if config.get("peft_type") != "SPEFT":
        raise AdapterFolderError(f"{path!r} holds a {config.get('peft_type')!r} adapter, not a SPEFT one.")
    try:
        tensors = read_weights(weights_path)
        return AdapterFolder(path, config, tensors, file_deltas(tensors, weights_path))
    except CorruptAdapterError as error:
        raise AdapterFolderError(f"Cannot read the adapter in {path!r}: {error}") from None


def summarize_adapter(path: str, folder: Optional[AdapterFolder] = None) -> AdapterSummary:
    """The `AdapterSummary` of an adapter folder (read with `read_adapter_folder` unless `folder` is given)."""
    folder = folder or read_adapter_folder(path)
    dtypes = {key.rsplit(".", 1)[1]: _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))
              for key, tensor in folder.tensors.items() if ".speft_" in key}
    modules = [ModuleSummary(name, delta.shape, delta.indices.numel(),
                             0 if delta.residual is None else delta.residual[0].numel())
               for name, delta in folder.deltas.items()]
    values_dtype = dtypes.get("speft_values", "F32")
    return AdapterSummary(path=path, config=folder.config, modules=sorted(modules, key=lambda m: _natural(m.name)),
                          dtypes=dtypes, file_bytes=os.path.getsize(folder.weights_path),
                          values_bytes_per_entry=_DTYPE_BYTES.get(values_dtype, 4))


def model_summary(peft_model: Any, adapter_name: str, path: str) -> AdapterSummary:
    """The `AdapterSummary` of `adapter_name` as `peft_model.save_pretrained` just saved it to `path`, built from the
    model and its config in memory (the adapter file, safetensors or pickle, is not read back; only its size is looked
    up)."""
    from .layer import sparse_layers

    config = peft_model.peft_config[adapter_name]
    modules, dtypes = [], {}
    for name, layer in sparse_layers(peft_model, adapter_name).items():
        tensors = {attribute: getattr(layer, attribute)[adapter_name] for attribute in
                   (*MASK_ATTRIBUTES, *RESIDUAL_ATTRIBUTES, "speft_lora_A", "speft_lora_B")
                   if adapter_name in getattr(layer, attribute)}
        dtypes.update({attribute: _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))
                       for attribute, tensor in tensors.items()})
        residual = tensors.get("speft_residual_indices")
        modules.append(ModuleSummary(name.removeprefix("base_model.model."), (layer.out_features, layer.in_features),
                                     tensors["speft_indices"].numel(), 0 if residual is None else residual.numel()))
    saved = json.loads(json.dumps({**config.to_dict(), "saved_masks": True}, default=_json_default))
    return AdapterSummary(path=path, config=saved, modules=sorted(modules, key=lambda m: _natural(m.name)),
                          dtypes=dtypes, file_bytes=os.path.getsize(weights_file(path)),
                          values_bytes_per_entry=_DTYPE_BYTES.get(dtypes.get("speft_values", "F32"), 4))


def _json_default(value: Any) -> Any:
    """The JSON form peft writes for config values that JSON lacks (sets of module names, enums)."""
    if isinstance(value, set):
        return sorted(value)
    return getattr(value, "value", str(value))


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def human_bytes(count: int) -> str:
    """`count` bytes in B, KiB, MiB or GiB (the largest unit it reaches)."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} GiB"


def _replace_block(text: str, start: str, end: str, block: Optional[str]) -> str:
    """`text` with the block between the `start`/`end` markers replaced by `block` (appended if absent)."""
    if start in text and end in text:
        before, after = text[: text.index(start)], text[text.index(end) + len(end):]
        return before + (block or "") + after
    return text.rstrip() + "\n\n" + block + "\n" if block else text


def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and not os.path.isabs(name) and not os.path.exists(name) and name.count("/") <= 1


def card_section(summary: AdapterSummary, repo_id: Optional[str] = None) -> str:
    """The Markdown SPEFT section of the model card (a local base path is never written into it)."""
    config = summary.config
    base = config.get("base_model_name_or_path")
    base = f"`{base}`" if _is_hub_id(base) else "a local base model"
    budget = next((f"`{key}={config[key]}`" for key in ("density", "num_params", "match_lora_rank")
                   if config.get(key) is not None), "unknown")
    update = config.get("mask_update", "static")
    if update == "dynamic":
        update += f" (every {config.get('update_interval')} steps, optimizer reset: {config.get('reset_optimizer')})"
    lines = [
        CARD_START,
        "## SPEFT adapter",
        "",
        f"A salience-aware sparse delta (SPEFT, trained with the `hf-speft` library) on {base}: θ = θ0 + θ_sp, with "
        f"θ_sp nonzero only on the {summary.nnz:,} weights "
        f"({100 * summary.density:.4f}% of the {summary.targeted:,} targeted ones) that the salience measure ranked "
        "highest.",
        "",
        "| | |",
        "|---|---|",
        f"| salience measure | `{config.get('salience')}` |",
        f"| mask scope | `{config.get('mask_scope')}` |",
        f"| mask updates | {update} |",
        f"| budget | {budget} → {summary.nnz:,} trainable weights |",
        f"| equivalent LoRA rank | {summary.matched_lora_rank:.2f} (same trainable count on the same modules) |",
        f"| adapter file | {human_bytes(summary.file_bytes)} (a dense delta: {human_bytes(summary.dense_delta_bytes)}; "
        f"a LoRA of the same trainable count: {human_bytes(summary.lora_bytes)}) |",
    ]
    lines += ["", "### Density per module", "", "| module | shape | trainable | density |", "|---|---|---:|---:|"]
    lines += [f"| `{m.name}` | {m.shape[0]}×{m.shape[1]} | {m.nnz:,} | {m.density:.5f} |" for m in summary.modules]
    source = repo_id or "<this repository or folder>"
    lines += [
        "",
        "### Loading",
        "",
        "```python",
        "import hf_speft  # registers SPEFT with peft",
        "from peft import AutoPeftModel",
        f'model = AutoPeftModel.from_pretrained("{source}")',
        "```",
        CARD_END,
    ]
    return "\n".join(lines)


def update_model_card(path: str, repo_id: Optional[str] = None, training: Optional[dict[str, Any]] = None,
                      base_model: Optional[str] = None, summary: Optional[AdapterSummary] = None) -> ModelCard:
    """Add (or refresh) the SPEFT metadata and section of the README.md in an adapter folder and return the card.

    `base_model` overrides the config's `base_model_name_or_path`; a local path is not written as `base_model`
    metadata (the Hub rejects it), only into the text. `training` (e.g. steps, losses, metrics, data) fills a separate
    block that later saves without it leave as it is. `summary` describes the adapter (default: read from the folder;
    a save passes `model_summary`, so it never reads back the file it wrote).
    """
    summary = summary or summarize_adapter(path)
    if base_model:
        summary.config["base_model_name_or_path"] = base_model
    readme = os.path.join(path, "README.md")
    card = _card(readme)
    if _is_generated(card.text):  # peft's or trl's template: replaced by the facts this card can state
        card.text = f"\n# {_title(path, repo_id, summary)}\n"
    for key in ("license", "licence"):  # trl's template writes a literal "licence: license"
        if str(getattr(card.data, key, "") or "").lower() in ("license", "licence", "[more information needed]"):
            delattr(card.data, key) if key == "licence" else setattr(card.data, key, None)
    if not _is_hub_id(getattr(card.data, "model_name", None)):
        card.data.model_name = None  # trl writes the output folder here
    card.data.library_name = "peft"
    base = summary.config.get("base_model_name_or_path")
    if _is_hub_id(base):
        card.data.base_model = base
    elif not _is_hub_id(card.data.base_model):  # keep a Hub id set earlier (e.g. by an override)
        card.data.base_model = None
    # peft tags the base as "base_model:adapter:<id>"; drop such tags that carry no Hub id (local or empty paths).
    tags = {tag for tag in card.data.tags or [] if not tag.startswith("base_model:") or _is_hub_id(tag.split(":")[-1])}
    tags |= {"peft", "speft", "hf-speft", "sparse-fine-tuning", f"salience:{summary.config.get('salience')}"}
    card.data.tags = sorted(tags)
    card.text = _replace_block(card.text, CARD_START, CARD_END, card_section(summary, repo_id))
    if training:
        lines = [TRAINING_START, "### Training", ""] + [f"- {key}: {value}" for key, value in training.items()]
        card.text = _replace_block(card.text, TRAINING_START, TRAINING_END, "\n".join(lines + [TRAINING_END]))
    card.save(readme)
    return card


def _card(readme: str) -> ModelCard:
    """The card in `readme` (a new one if absent). A text without a metadata block (peft writes one when the base has
    no Hub id; a new card has none) gets an empty block first: huggingface_hub would add it too, but warns "Repo card
    metadata block was not found" on every save."""
    text = ""
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
    return ModelCard(text if REGEX_YAML_BLOCK.search(text) else f"---\n{{}}\n---\n{text}")


GENERATED_CARD_MARKERS = ("[More Information Needed]", "This model is a fine-tuned version of", "## Quick start")


def _is_generated(text: str) -> bool:
    """True for the text of peft's card template or of the Trainer's/trl's generated card, whose placeholders, local
    paths and generic examples a SPEFT card replaces; a card written by hand is kept."""
    return any(marker in text for marker in GENERATED_CARD_MARKERS)


def _title(path: str, repo_id: Optional[str], summary: AdapterSummary) -> str:
    name = repo_id or os.path.basename(os.path.normpath(path))
    base = summary.config.get("base_model_name_or_path")
    return f"{name}: a SPEFT adapter for {base}" if _is_hub_id(base) else f"{name}: a SPEFT adapter"


def push_to_hub(model, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                commit_message: str = "Upload SPEFT adapter", base_model: Optional[str] = None,
                training: Optional[dict[str, Any]] = None):
    """Publish a SPEFT `PeftModel`'s adapter folder (config, safetensors, model card) to the Hub; returns the commit.

    An existing card in the repo keeps its text; the SPEFT metadata and sections are added or refreshed.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            remote = ModelCard.load(repo_id, token=token)
        except (EntryNotFoundError, RepositoryNotFoundError):
            remote = None
        model.save_pretrained(folder)
        if remote is not None:
            remote.save(os.path.join(folder, "README.md"))
        update_model_card(folder, repo_id=repo_id, training=training, base_model=base_model)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
