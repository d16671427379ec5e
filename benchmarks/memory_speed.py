"""Training step time and memory of SPEFT vs LoRA, sparse peers, a dense-masked simulation and full fine-tuning.

Each method trains a tiny Llama (hidden 1024, 4 layers, vocab 8192, batch 4x256, all 7 projection types targeted) in a
fresh subprocess; rounds are interleaved and every figure is also given as a ratio to LoRA from the same run. `speft`
is SPEFT's default path (`fold_weights="auto"`: the scoped fold; the automatic kernel choice for the values' gradient,
recorded per round; `HF_SPEFT_KERNEL` forces one), `speft_unfolded` the same with `fold_weights=False` (the base
product plus sparse corrections, what runs where folding does not apply). `--dtype bfloat16` builds the base in bf16,
as 8B models are trained; the adapters keep peft's float32 trainable weights either way.

    python benchmarks/memory_speed.py                  # 3 rounds, JSON lines to benchmarks/results/memory_speed.jsonl
    python benchmarks/memory_speed.py --rounds 1 --steps 3 --methods lora speft   # quick look
    python benchmarks/memory_speed.py --dtype bfloat16 --methods lora speft speft_unfolded \
        --output benchmarks/results/memory_speed_bf16.jsonl
"""

from __future__ import annotations

from harness import (TINY_LLAMA_ARGUMENTS, LLAMA_PROJECTIONS, add_tiny_llama_arguments, measure_training, parser_for,
                     print_ratio_table, run, tiny_llama_config)

METHODS = ["full", "lora", "supertuning", "shira", "dense_sim", "speft", "speft_unfolded"]
RANK = 8


def _build(method: str, args):
    import torch
    from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    import hf_speft

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(args, num_attention_heads=16, num_key_value_heads=4))
    model = model.to(getattr(torch, args.dtype))
    targeted = [m for n, m in model.named_modules() if n.split(".")[-1] in LLAMA_PROJECTIONS]
    lora_count = sum(RANK * (m.in_features + m.out_features) for m in targeted)
    targeted_numel = sum(m.weight.numel() for m in targeted)
    if method == "full":
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=LLAMA_PROJECTIONS))
    if method == "shira":
        return get_peft_model(model, ShiraConfig(r=RANK, target_modules=LLAMA_PROJECTIONS))
    if method == "supertuning":
        return get_peft_model(model, SupertuningConfig(sparsity=1 - lora_count / targeted_numel,
                                                       target_modules=LLAMA_PROJECTIONS))
    if method == "dense_sim":
        return _dense_masked_simulation(model, targeted, lora_count / targeted_numel)
    config = hf_speft.SparsePeftConfig(target_modules=LLAMA_PROJECTIONS, match_lora_rank=RANK, salience="magnitude",
                                       fold_weights="auto" if method == "speft" else False)
    return get_peft_model(model, config)


def _dense_masked_simulation(model, targeted, density):
    """What the paper's code does: a full-size delta per weight whose gradient is multiplied by a 0/1 mask."""
    import torch
    from torch.nn.utils import parametrize

    class MaskedDelta(torch.nn.Module):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.delta = torch.nn.Parameter(torch.zeros_like(weight))
            k = max(1, round(density * weight.numel()))
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[weight.abs().reshape(-1).topk(k).indices] = True
            self.register_buffer("mask", mask.view_as(weight))
            self.delta.register_hook(lambda grad: grad * self.mask)

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight + self.delta

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in targeted:
        parametrize.register_parametrization(module, "weight", MaskedDelta(module.weight.detach()))
        module.parametrizations.weight.original.requires_grad_(False)
    return model


def worker(method: str, args) -> dict:
    """Train `args.steps` steps of one method and measure it (runs in its own process)."""
    import torch

    from hf_speft.ops import kernel_choices

    torch.manual_seed(0)
    return {"method": method, **measure_training(_build(method, args), args),
            "kernel_choices": dict(kernel_choices())}  # SPEFT's automatic kernel decisions (shape bucket -> strategy)


RATIO_FIELDS = ["step_time_s", "inference_time_s", "peak_extra_rss_bytes", "optimizer_state_bytes",
                "saved_for_backward_bytes"]


def main() -> None:
    parser = parser_for(__doc__, METHODS, "memory_speed.jsonl")
    add_tiny_llama_arguments(parser, hidden=1024, layers=4, seq_len=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the base model's dtype")
    passthrough = [*TINY_LLAMA_ARGUMENTS, "dtype"]
    args, rounds = run(parser, __file__, worker, passthrough, RATIO_FIELDS)
    print_ratio_table(args, rounds, "method", [
        ("÷LoRA", "step_time_s"), ("inference ÷LoRA", "inference_time_s"),
        ("peak extra RSS ÷LoRA", "peak_extra_rss_bytes"), ("optimizer ÷LoRA", "optimizer_state_bytes"),
        ("saved-for-backward ÷LoRA", "saved_for_backward_bytes")])


if __name__ == "__main__":
    main()
