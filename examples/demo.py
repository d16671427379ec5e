"""`make demo`: an offline, CPU, end-to-end SPEFT fine-tune of a tiny Llama built from a config.

Generates a small sequence task (each sequence counts up by a stride the first token sets), puts a magnitude-salience
sparse delta on all seven projection types at the budget of a rank-4 LoRA, trains it, saves the adapter, reloads it
on a fresh copy of the base model and checks that the reloaded and the merged model give the adapter's outputs.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_speft

VOCAB, LENGTH = 32, 24
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH)
    return LlamaForCausalLM(config).eval()


def counting_batch(batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sequences start, start+stride, start+2·stride, ... (mod VOCAB); the stride is 1..4."""
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=generator)
    stride = torch.randint(1, 5, (batch_size, 1), generator=generator)
    ids = (start + stride * torch.arange(LENGTH)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--output_dir", default=None, help="where to save the adapter (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(4, os.cpu_count() or 1))

    config = hf_speft.SparsePeftConfig(target_modules=TARGETS, match_lora_rank=4, salience="magnitude")
    model = get_peft_model(base_model(), config)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"SPEFT: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), "
          f"budget = LoRA r=4 on {len(TARGETS)} projection types")

    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        loss = model(**counting_batch(16, generator)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    train_time = time.perf_counter() - start
    model.eval()

    eval_batch = counting_batch(64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        adapter_logits = model(input_ids=eval_batch["input_ids"]).logits
        eval_loss = model(**eval_batch).loss.item()
        base_loss = base_model()(**eval_batch).loss.item()

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="speft-demo-")
    model.save_pretrained(output_dir)
    size = os.path.getsize(os.path.join(output_dir, "adapter_model.safetensors"))
    reloaded = PeftModel.from_pretrained(base_model(), output_dir).eval()
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        reload_error = (reloaded.base_model.model(input_ids=eval_batch["input_ids"]).logits - adapter_logits)
        merged_error = (merged(input_ids=eval_batch["input_ids"]).logits - adapter_logits).abs().max().item()
    reload_error = reload_error.abs().max().item()

    print("\n=== hf-speft demo summary ===")
    print(f"loss: first 50 steps {sum(losses[:50]) / 50:.4f} -> last 50 steps {sum(losses[-50:]) / 50:.4f} "
          f"({args.steps} steps, {train_time:.1f}s)")
    print(f"held-out loss: base model {base_loss:.4f}, with SPEFT adapter {eval_loss:.4f}")
    print(f"adapter saved to {output_dir} ({size / 1024:.1f} KiB: int32 indices + fp32 values)")
    print(f"reloaded vs trained outputs: max |diff| = {reload_error:.2e}")
    print(f"merged   vs adapter outputs: max |diff| = {merged_error:.2e}")
    ok = losses[-1] < losses[0] and eval_loss < base_loss and reload_error < 1e-4 and merged_error < 1e-4
    print("RESULT:", "OK" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
