"""Training step on a bitsandbytes-quantized base: SPEFT's transient merge vs its unmerged path vs peft LoRA.

Each method trains a tiny Llama (hidden 512, 2 layers, vocab 8192, batch 4x128, all 7 projection types targeted,
LoRA r=8 and SPEFT at the same budget) loaded with `--base` quantization, in a fresh subprocess; rounds are
interleaved and every figure is also a ratio to LoRA on the same quantized base in the same round.
`speft_auto` is `fold_weights="auto"` (the transient merge where it is the faster product, `hf_speft/quantized.py`:
always in training; for no-grad forwards of several tokens on the standard layouts); `speft_unmerged` the
bitsandbytes base product plus the sparse correction everywhere (what every quantized layer ran before the merge).
`--base 4bit_packed` runs the 4-bit layers in bitsandbytes' packed AVX512-BF16 CPU layout (one no-grad eval forward
packs them, as it does in real use); it needs such a CPU. On that layout the packed kernel has no backward, so
`lora` and `speft_unmerged` get no input gradient through the base (their step does less work than a correct one).

    for base in 8bit 4bit 4bit_packed; do python benchmarks/quantized.py --base $base; done   # 3 rounds each
    python benchmarks/quantized.py --base 4bit --rounds 1 --steps 2                          # quick look
"""

from __future__ import annotations

import tempfile
import time

from harness import (TINY_LLAMA_ARGUMENTS, LLAMA_PROJECTIONS, add_tiny_llama_arguments, measure_training, parser_for,
                     print_ratio_table, run, tiny_llama_config, VOCAB_SIZE)

METHODS = ["lora", "speft_unmerged", "speft_auto"]
BASES = ["8bit", "4bit", "4bit_packed"]
RANK = 8


def _quantized_model(args):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = tiny_llama_config(args, num_attention_heads=8, num_key_value_heads=2)
    quantization = (BitsAndBytesConfig(load_in_8bit=True) if args.base == "8bit" else
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype))
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=dtype,
                                                     device_map="cpu")
    if args.base == "4bit_packed":
        from hf_speft.integrations.compat import is_cpu_packed

        model.eval()
        with torch.no_grad():  # bitsandbytes packs each 4-bit layer on its first no-grad eval forward
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        layers = [m.weight for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]
        if not all(is_cpu_packed(weight) for weight in layers):
            raise SystemExit("--base 4bit_packed needs a CPU with AVX512-BF16 (bitsandbytes packs only there)")
    return model


def _build(method: str, args):
    from peft import LoraConfig, get_peft_model

    import hf_speft
    from hf_speft.quantized import QuantizedLinear

    model = _quantized_model(args)
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=LLAMA_PROJECTIONS))
    if method == "speft_unmerged":
        QuantizedLinear.merges = lambda self, x: None  # this worker process only: the unmerged forward everywhere
    config = hf_speft.SparsePeftConfig(target_modules=LLAMA_PROJECTIONS, match_lora_rank=RANK, salience="magnitude",
                                       fold_weights="auto")
    return get_peft_model(model, config)


def worker(method: str, args) -> dict:
    """Train `args.steps` steps of one method on the quantized base and measure it (runs in its own process)."""
    import torch

    torch.manual_seed(0)
    model = _build(method, args)
    measured = measure_training(model, args)
    ids = torch.randint(0, VOCAB_SIZE, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(20):  # one token of one sequence: a decoding step's shapes (no cache: the projections count)
            model(input_ids=ids)
        decode = (time.perf_counter() - start) / 20
    return {"method": method, "base": args.base, "dtype": args.dtype, "threads": torch.get_num_threads(), **measured,
            "decode_time_s": decode}


RATIO_FIELDS = ["step_time_s", "inference_time_s", "decode_time_s", "peak_extra_rss_bytes", "saved_for_backward_bytes"]


def main() -> None:
    parser = parser_for(__doc__, METHODS, "quantized.jsonl")
    parser.add_argument("--base", choices=BASES, default="4bit")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the model's and the 4-bit layers' compute dtype")
    add_tiny_llama_arguments(parser, hidden=512, layers=2, seq_len=128)
    known, _ = parser.parse_known_args()
    parser.set_defaults(output=parser.get_default("output").replace("quantized.jsonl", f"quantized_{known.base}.jsonl"))
    passthrough = ["base", "dtype", *TINY_LLAMA_ARGUMENTS]
    args, rounds = run(parser, __file__, worker, passthrough, RATIO_FIELDS)
    print_ratio_table(args, rounds, f"method ({args.base}, {args.dtype})", [
        ("÷LoRA", "step_time_s"), ("no-grad forward ÷LoRA", "inference_time_s"),
        ("1-token forward ÷LoRA", "decode_time_s"), ("peak extra RSS ÷LoRA", "peak_extra_rss_bytes"),
        ("saved-for-backward ÷LoRA", "saved_for_backward_bytes")])


if __name__ == "__main__":
    main()
