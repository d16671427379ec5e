"""Measure the peak RSS growth of one training step of a tiny Llama on CPU (fp32), for tests/test_memory.py.

Run with MALLOC_MMAP_THRESHOLD_ fixed so freed tensors return to the OS at once; the kernel's peak (VmHWM) is reset
just before the step. Prints {"step_peak_bytes": ..., "config": ...} as its last line.
"""

import json
import sys

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_speft.methods import method_peft_config

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512)


def process_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def main(method: str, checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), attn_implementation="sdpa")
    if checkpointing:
        model.activation_checkpointing_enable()
    peft_config = method_peft_config(method, target_modules="all-linear", lora_r=8, salience="magnitude")
    if peft_config is not None:  # the method's adapter at LoRA r=8's budget, as estimate_memory builds it
        model = get_peft_model(model, peft_config)
    if checkpointing and method != "full":
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 256))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()  # optimizer state and cached layouts exist from here on
    before = process_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    print(json.dumps({"step_peak_bytes": process_status("VmHWM") - before, "config": CONFIG}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "True")
