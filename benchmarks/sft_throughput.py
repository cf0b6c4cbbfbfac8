"""Tiny SFT throughput: lmalign vs a plain TRL script vs a hand-written PyTorch loop.

    python benchmarks/sft_throughput.py [--steps 150] [--repeats 2] [--trl-defaults]

Every runner trains the embedded tiny model on the same tiny_sft rows, for the same number of
optimizer steps, with the same global batch (16 per step x 2 accumulation), learning rate,
schedule, seed and assistant-only loss, in this one process. Throughput is non-padding tokens
per second of training time (what TRL reports as num_tokens / train_runtime). The figures are
ratios against the baselines measured in the same run; nothing here asserts a speed.

Two TRL baselines: the same SFTTrainer given exactly lmalign's TrainingArguments (what lmalign
adds around TRL: its callbacks, peak-memory reading, progress line, model and data loading), and a
plain script with TRL's own arguments and CPU settings (each side's defaults). "Where the time
went" reruns lmalign with one of its additions left out at a time, and times its callbacks.
--trl-defaults adds TRL's own CPU defaults (bf16 + gradient checkpointing) for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import typed_config  # noqa: E402  (composes the real config tree)

PER_DEVICE, ACCUMULATION = 16, 2


def setup(steps: int):
    from lmalign import data, models

    config = typed_config(f"method.max_steps={steps}", "eval=none",
                          f"dataset.max_samples={steps * PER_DEVICE * ACCUMULATION}",
                          f"hardware.per_device_batch_size={PER_DEVICE}",
                          f"method.global_batch_size={PER_DEVICE * ACCUMULATION}",
                          "method.eval_steps=null", f"method.save_steps={steps * 10}",
                          f"method.logging_steps={steps}")
    cache = Path(tempfile.mkdtemp(prefix="lmalign-bench-"))
    base = models.resolve(config.model, str(cache))
    train, _ = data.load_splits(config.dataset)
    return config, base, train.select(range(steps * PER_DEVICE * ACCUMULATION))


def run_lmalign(config, base, _train, leave_out: str | None = None,
                callback_seconds: dict | None = None) -> tuple[float, float]:
    """lmalign's SFT as a run does it; `leave_out` one of its additions to TRL (LEFT_OUT)."""
    from lmalign import models, training
    from lmalign.methods import sft

    with tempfile.TemporaryDirectory() as run_dir, LEFT_OUT[leave_out](training):
        start = models.Start(base, None, tokenizer=base)
        trainer = sft.build(config, Path(run_dir), start)
        if callback_seconds is not None:
            _time_callbacks(trainer, callback_seconds)
        summary = training.train_and_save(trainer, config, Path(run_dir))
    return summary["train_tokens_per_s"], summary["train_loss"]


@contextlib.contextmanager
def _no_peak_memory(training):
    original = training.peak_memory
    training.peak_memory = lambda found: contextlib.nullcontext()
    try:
        yield
    finally:
        training.peak_memory = original


@contextlib.contextmanager
def _no_progress_line(training):
    """TRL's own progress bar instead of lmalign's compact one."""
    original = training.use_compact_progress
    training.use_compact_progress = lambda trainer: None
    try:
        yield
    finally:
        training.use_compact_progress = original


@contextlib.contextmanager
def _no_stop_on_signal(training):
    original = training.StopOnSignal.on_step_end
    training.StopOnSignal.on_step_end = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        training.StopOnSignal.on_step_end = original


LEFT_OUT = {None: lambda training: contextlib.nullcontext(),
            "peak memory reading": _no_peak_memory,
            "compact progress line": _no_progress_line,
            "stop-on-signal check": _no_stop_on_signal}


def _time_callbacks(trainer, seconds: dict) -> None:
    """Each callback's own time, added up over the run, into `seconds` by class name."""
    handler = trainer.callback_handler

    def call_event(event, args, state, control, **kwargs):
        for callback in handler.callbacks:
            started = time.perf_counter()
            result = getattr(callback, event)(
                args, state, control, model=handler.model, processing_class=handler.processing_class,
                optimizer=handler.optimizer, lr_scheduler=handler.lr_scheduler,
                train_dataloader=handler.train_dataloader, eval_dataloader=handler.eval_dataloader,
                **kwargs)
            seconds[type(callback).__name__] += time.perf_counter() - started
            if result is not None:
                control = result
        return control

    handler.call_event = call_event


def _train_plain(args, base, train) -> tuple[float, float]:
    """A bare SFTTrainer with these arguments: (tokens/s, mean loss)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                         train_dataset=train, processing_class=AutoTokenizer.from_pretrained(base))
    result = trainer.train()
    tokens = next(h["num_tokens"] for h in reversed(trainer.state.log_history)
                  if "num_tokens" in h)
    return tokens / result.metrics["train_runtime"], result.metrics["train_loss"]


def run_trl_with_lmalign_arguments(config, base, train) -> tuple[float, float]:
    """The same SFTTrainer with exactly the TrainingArguments lmalign gives it, nothing else."""
    from trl import SFTConfig

    from lmalign import training

    method = config.method
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**training.trainer_arguments(config, Path(out), [], has_eval=False),
                         max_length=method.max_length, packing=method.packing,
                         packing_strategy=method.packing_strategy,
                         padding_free=method.padding_free, assistant_only_loss=True,
                         completion_only_loss=method.completion_only_loss)
        return _train_plain(args, base, train)


def run_plain_trl(config, base, train, trl_defaults: bool = False) -> tuple[float, float]:
    from trl import SFTConfig

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
        return _train_plain(args, base, train)


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
    callback_seconds: dict[str, float] = defaultdict(float)
    runners = {"lmalign": lambda c, b, t: run_lmalign(c, b, t, callback_seconds=callback_seconds),
               "TRL, lmalign's arguments": run_trl_with_lmalign_arguments,
               "TRL, its own (CPU settings)": run_plain_trl,
               "hand-written loop": run_hand_loop}
    for left in (name for name in LEFT_OUT if name):
        runners[f"lmalign without {left}"] = lambda c, b, t, left=left: run_lmalign(c, b, t, left)
    if options.trl_defaults:
        runners["TRL, its defaults"] = lambda c, b, t: run_plain_trl(c, b, t, True)
    run_hand_loop(config, base, train.select(range(PER_DEVICE * ACCUMULATION)))  # warm up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    names = list(runners)
    for repeat in range(options.repeats):
        # Each repeat starts one runner later: a machine that speeds up or slows down over the
        # run (frequency, other tenants) does not favour whoever always runs first or last.
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            results[name].append(runners[name](config, base, train))
    best = {name: max(r[0] for r in runs) for name, runs in results.items()}
    print(f"\ntiny SFT, {options.steps} steps x {PER_DEVICE * ACCUMULATION} sequences, "
          f"torch threads {torch.get_num_threads()}, best of {options.repeats} "
          "(spread: (best - worst) / best, the noise between repeats)")
    print(f"{'runner':36} {'tokens/s':>10} {'spread':>7} {'mean loss':>10}")
    for name, runs in results.items():
        spread = (best[name] - min(r[0] for r in runs)) / best[name]
        print(f"{name:36} {best[name]:10.0f} {spread:7.1%} {runs[-1][1]:10.4f}")
    print("\nratios:")
    same_arguments = best["TRL, lmalign's arguments"]
    print(f"  lmalign / TRL with lmalign's arguments (identical arguments): "
          f"{best['lmalign'] / same_arguments:.3f}")
    print(f"  lmalign / TRL with its own arguments (each side's defaults): "
          f"{best['lmalign'] / best['TRL, its own (CPU settings)']:.3f}")
    print(f"  lmalign / hand-written loop: {best['lmalign'] / best['hand-written loop']:.3f}")
    print(f"  TRL with its own arguments / hand-written loop: "
          f"{best['TRL, its own (CPU settings)'] / best['hand-written loop']:.3f}")
    print("\nwhere lmalign's time went:")
    for left in (name for name in LEFT_OUT if name):
        gain = best[f"lmalign without {left}"] / best["lmalign"] - 1
        print(f"  without its {left}: {gain:+.1%} tokens/s")
    total = sum(callback_seconds.values())
    print(f"  in callbacks, over {options.repeats} runs: {total:.2f} s; "
          + ", ".join(f"{name} {spent:.2f} s" for name, spent in
                      sorted(callback_seconds.items(), key=lambda item: -item[1])[:5]))


if __name__ == "__main__":
    main()
