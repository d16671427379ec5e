"""Whole training runs through the Trainer stack: SpeftSFTTrainer (static and dynamic masks) vs LoRA through trl's
SFTTrainer, on the same tiny Llama and prompt-completion data, at the same parameter budget.

Each method runs in a fresh subprocess; rounds are interleaved; step time and peak memory are also given as ratios
to LoRA from the same round, and the dynamic-mask overhead as seconds per update and as a multiple of a step.

    python benchmarks/trainer_run.py            # 3 rounds -> benchmarks/results/trainer_run.jsonl
    python benchmarks/trainer_run.py --rounds 1 --steps 10
"""

from __future__ import annotations

import statistics
import time

from harness import LLAMA_PROJECTIONS, PeakRss, median, parser_for, rss_bytes, run

METHODS = ["lora", "speft_static", "speft_dynamic"]
RANK = 8
NUMBERS = 1000


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "count": 3, ":": 4, **{str(i): 5 + i for i in range(NUMBERS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _dataset(size: int, prompt_numbers: int, completion_numbers: int):
    """'count : a a+s a+2s ...' -> the next numbers of the sequence (mod NUMBERS)."""
    import random

    from datasets import Dataset

    rng = random.Random(0)
    rows = []
    for _ in range(size):
        start, stride = rng.randrange(NUMBERS), rng.randrange(1, 4)
        sequence = [str((start + stride * i) % NUMBERS) for i in range(prompt_numbers + completion_numbers)]
        rows.append({"prompt": "count : " + " ".join(sequence[:prompt_numbers]),
                     "completion": " " + " ".join(sequence[prompt_numbers:])})
    return Dataset.from_list(rows)


def worker(method: str, args) -> dict:
    """Run one method's training and measure it (in its own process)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import hf_speft

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, *a, **k):
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._start)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=NUMBERS + 5, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=128)
    base = LlamaForCausalLM(config)
    if method == "lora":
        model = get_peft_model(base, LoraConfig(target_modules=LLAMA_PROJECTIONS, r=RANK, lora_alpha=2 * RANK))
    else:
        model = get_peft_model(base, hf_speft.SparsePeftConfig(
            target_modules=LLAMA_PROJECTIONS, match_lora_rank=RANK, salience="gradient",
            salience_batches=args.salience_batches,
            mask_update="dynamic" if method == "speft_dynamic" else "static", update_interval=args.update_interval))
    sft_args = SFTConfig(f"/tmp/hf_speft_bench_{method}", max_steps=args.steps, per_device_train_batch_size=args.batch,
                         learning_rate=1e-3 if method == "lora" else 1e-2, logging_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True,
                         gradient_checkpointing=False, completion_only_loss=True, seed=0)
    trainer_cls = SFTTrainer if method == "lora" else hf_speft.SpeftSFTTrainer
    timer = StepTimer()
    trainer = trainer_cls(model=model, args=sft_args, processing_class=_tokenizer(), callbacks=[timer],
                          train_dataset=_dataset(args.batch * args.steps, args.prompt_numbers, 8))
    rss_before = rss_bytes()
    with PeakRss() as rss:
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    logs = trainer.state.log_history
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    updates = [entry["speft/mask_update_seconds"] for entry in logs if "speft/mask_update_seconds" in entry]
    salience = [entry["speft/salience_seconds"] for entry in logs if "speft/salience_seconds" in entry]
    return {
        "method": method,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_time_s": statistics.median(timer.times[args.warmup:]),
        "train_wall_s": total,
        "salience_s": salience[0] if salience else 0.0,
        "mask_update_s": statistics.median(updates) if updates else 0.0,
        "mask_updates": len(updates),
        "peak_extra_rss_bytes": rss.peak - rss_before,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main() -> None:
    parser = parser_for(__doc__, METHODS, "trainer_run.jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_numbers", type=int, default=48)
    parser.add_argument("--salience_batches", type=int, default=8)
    parser.add_argument("--update_interval", type=int, default=10)
    passthrough = ["steps", "warmup", "hidden", "layers", "batch", "prompt_numbers", "salience_batches",
                   "update_interval"]
    args, rounds = run(parser, __file__, worker, passthrough, ["step_time_s", "peak_extra_rss_bytes"])
    print("| method | trainable | step s | step ÷LoRA | peak extra RSS ÷LoRA | salience s | mask update s "
          "(÷ step) | loss first → last |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for method in args.methods:
        def med(key):
            return median(rounds, method, key)

        update_per_step = statistics.median(r[method]["mask_update_s"] / r[method]["step_time_s"] for r in rounds)
        print(f"| {method} | {rounds[0][method]['trainable_params']:,} | {med('step_time_s'):.3f} | "
              f"{med('step_time_s/lora'):.2f} | {med('peak_extra_rss_bytes/lora'):.2f} | {med('salience_s'):.2f} | "
              f"{med('mask_update_s'):.2f} ({update_per_step:.1f}) | "
              f"{med('first_loss'):.2f} → {med('last_loss'):.2f} |")


if __name__ == "__main__":
    main()
