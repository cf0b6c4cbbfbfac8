"""Tiny SFT throughput: lmalign vs a plain TRL script vs a hand-written PyTorch loop.

    python benchmarks/sft_throughput.py [--steps 150] [--repeats 2] [--trl-defaults]

All three train the embedded tiny model on the same tiny_sft rows, for the same number of
optimizer steps, with the same global batch (16 per step x 2 accumulation), learning rate,
schedule, seed and assistant-only loss, in this one process. Throughput is non-padding tokens
per second of training time (what TRL reports as num_tokens / train_runtime). The figures are
ratios against the baselines measured in the same run; nothing here asserts a speed.
--trl-defaults adds TRL's own CPU defaults (bf16 + gradient checkpointing) for reference.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import typed_config  # noqa: E402  (composes the real config tree)

PER_DEVICE, ACCUMULATION = 16, 2


def setup(steps: int):
    from lmalign import data, models

    config = typed_config(f"method.max_steps={steps}", "eval=none",
                          f"hardware.per_device_batch_size={PER_DEVICE}",
                          f"method.global_batch_size={PER_DEVICE * ACCUMULATION}",
                          "method.eval_steps=null", f"method.save_steps={steps * 10}",
                          f"method.logging_steps={steps}")
    cache = Path(tempfile.mkdtemp(prefix="lmalign-bench-"))
    base = models.resolve(config.model, str(cache))
    train, _ = data.load_splits(config.dataset)
    return config, base, train.select(range(steps * PER_DEVICE * ACCUMULATION))


def run_lmalign(config, base, _train) -> tuple[float, float]:
    from lmalign import models
    from lmalign.methods import sft

    with tempfile.TemporaryDirectory() as run_dir:
        start = models.Start(base, None, tokenizer=base)
        summary = sft.train(config, Path(run_dir), start)
    return summary["train_tokens_per_s"], summary["train_loss"]


def run_plain_trl(config, base, train, trl_defaults: bool = False) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    method = config.method
    cpu_settings = {} if trl_defaults else {"bf16": False, "gradient_checkpointing": False}
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=method.max_steps,
                         per_device_train_batch_size=PER_DEVICE,
                         gradient_accumulation_steps=ACCUMULATION,
                         learning_rate=method.learning_rate, lr_scheduler_type="cosine",
                         warmup_steps=method.warmup_ratio, optim="adamw_torch",
                         max_length=method.max_length, assistant_only_loss=True, use_cpu=True,
                         seed=config.seed, data_seed=config.seed, save_strategy="no",
                         report_to=[], logging_steps=method.max_steps, disable_tqdm=True,
                         dataloader_pin_memory=False, **cpu_settings)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                             train_dataset=train,
                             processing_class=AutoTokenizer.from_pretrained(base))
        result = trainer.train()
    tokens = next(h["num_tokens"] for h in reversed(trainer.state.log_history)
                  if "num_tokens" in h)
    return tokens / result.metrics["train_runtime"], result.metrics["train_loss"]


def run_hand_loop(config, base, train) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    method = config.method
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.train()
    encoded = [tokenizer.apply_chat_template(row["messages"], return_dict=True,
                                             return_assistant_tokens_mask=True)
               for row in train]
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(config.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=method.learning_rate,
                                  weight_decay=method.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(method.warmup_ratio * method.max_steps), method.max_steps)
    tokens, losses, started = 0, [], time.perf_counter()
    for step in range(len(encoded) // (PER_DEVICE * ACCUMULATION)):
        micro = [order[(step * ACCUMULATION + a) * PER_DEVICE:][:PER_DEVICE]
                 for a in range(ACCUMULATION)]
        batches = [_collate([encoded[i] for i in idx], tokenizer.pad_token_id) for idx in micro]
        trained_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        step_loss = 0.0
        for batch in batches:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                ignore_index=-100, reduction="sum") / trained_tokens
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), method.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return tokens / (time.perf_counter() - started), statistics.fmean(losses)


def _collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        assistant = torch.tensor(row["assistant_masks"], dtype=torch.bool)
        labels[i, :n] = torch.where(assistant, ids[i, :n], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trl-defaults", action="store_true")
    options = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    config, base, train = setup(options.steps)
    runners = {"lmalign": run_lmalign, "plain TRL (CPU settings)": run_plain_trl,
               "hand-written loop": run_hand_loop}
    if options.trl_defaults:
        runners["plain TRL (its defaults)"] = lambda c, b, t: run_plain_trl(c, b, t, True)
    run_hand_loop(config, base, train.select(range(PER_DEVICE * ACCUMULATION)))  # warm up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(options.repeats):
        for name, runner in runners.items():
            results[name].append(runner(config, base, train))
    best = {name: max(r[0] for r in runs) for name, runs in results.items()}
    print(f"\ntiny SFT, {options.steps} steps x {PER_DEVICE * ACCUMULATION} sequences, "
          f"torch threads {torch.get_num_threads()}, best of {options.repeats}")
    print(f"{'runner':28} {'tokens/s':>10} {'mean loss':>10}")
    for name, runs in results.items():
        print(f"{name:28} {best[name]:10.0f} {runs[-1][1]:10.4f}")
    print("\nratios:")
    for baseline in [n for n in runners if n != "lmalign"]:
        print(f"  lmalign / {baseline}: {best['lmalign'] / best[baseline]:.2f}")


if __name__ == "__main__":
    main()
