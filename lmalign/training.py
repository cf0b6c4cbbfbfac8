"""What every method shares: the config mapped onto the trainer's arguments, resume, final save."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ProgressCallback, TrainerCallback

from lmalign import rundir
from lmalign.errors import TrainingStopped
from lmalign.models import Start
from lmalign.schema import Config, MethodConfig

log = logging.getLogger(__name__)


def trainer_arguments(config: Config, run_dir: Path, report_to: list[str],
                      has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and DPOConfig (both extend TrainingArguments)."""
    method, hardware = config.method, config.hardware
    evaluate = has_eval and method.eval_steps is not None
    return dict(
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        run_name=config.run_name or run_dir.name,
        seed=config.seed,
        data_seed=config.seed,
        per_device_train_batch_size=hardware.per_device_batch_size,
        per_device_eval_batch_size=hardware.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=method.learning_rate,
        lr_scheduler_type=method.lr_scheduler_type,
        warmup_steps=method.warmup_ratio,  # transformers 5: a value below 1 is a fraction of steps
        weight_decay=method.weight_decay,
        max_grad_norm=method.max_grad_norm,
        optim=method.optim,
        num_train_epochs=method.num_train_epochs,
        max_steps=method.max_steps,
        # Precision and checkpointing belong to the hardware profile: TRL's defaults (bf16 and
        # gradient checkpointing) are 28x slower on a CPU.
        bf16=hardware.precision == "bf16",
        fp16=hardware.precision == "fp16",
        activation_checkpointing=hardware.gradient_checkpointing,
        use_liger_kernel=hardware.liger_kernel,
        torch_compile=hardware.torch_compile,
        use_cpu=hardware.accelerator == "cpu",
        dataloader_num_workers=hardware.dataloader_num_workers,
        dataloader_pin_memory=hardware.accelerator == "cuda",
        logging_steps=method.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=method.save_steps,
        save_total_limit=method.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=method.eval_steps if evaluate else None,
        report_to=report_to,
        disable_tqdm=False,
    )


def starting_model(config: Config, start: Start):
    """(model, PEFT config for the trainer to apply). A run whose starting adapter is of its own
    kind trains that adapter further (no new PEFT config); otherwise the adapter is merged. A
    reward model continues only a reward model's adapter: a language model's has no score head."""
    from lmalign import models

    head = "reward" if config.method.name == "reward" else "causal_lm"
    continuing = start.adapter is not None and start.adapter_kind == config.method.peft and (
        head == "causal_lm" or models.is_reward_model(start.adapter))
    model = models.load_start(start, config.model, config.hardware, continue_adapter=continuing,
                              trains_weights=config.method.peft == "none", head=head)
    return model, None if continuing else peft_config(config.method, start.tokenizer)


def peft_config(method: MethodConfig, tokenizer_path: str):
    """PEFT's config for method.peft, or None for full fine-tuning. A reward model's adapter is
    PEFT's sequence-classification kind, which also trains (and saves) the new score head."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    task = TaskType.SEQ_CLS if method.name == "reward" else TaskType.CAUSAL_LM
    if method.peft == "lora":
        lora = method.lora
        return LoraConfig(task_type=task, r=lora.r, lora_alpha=lora.alpha,
                          lora_dropout=lora.dropout, target_modules=lora.target_modules)
    if method.peft == "prompt_tuning":
        settings = method.prompt_tuning
        init = {"prompt_tuning_init": PromptTuningInit.TEXT,
                "prompt_tuning_init_text": settings.init_text,
                "tokenizer_name_or_path": tokenizer_path} if settings.init_text else {}
        return PromptTuningConfig(task_type=task,
                                  num_virtual_tokens=settings.num_virtual_tokens, **init)
    return None


def resume_checkpoint(config: Config, run_dir: Path) -> str | None:
    if config.resume == "never":
        return None
    checkpoints = rundir.complete_checkpoints(run_dir)
    if not checkpoints:
        return None
    step, path = checkpoints[-1]
    log.info("resuming from %s (step %d)", path, step)
    return str(path)


class CompactProgress(ProgressCallback):
    """The trainer's progress bar, with one short line per logging step instead of a dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        shown = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "mean_token_accuracy",
                    "rewards/margins", "eval_rewards/margins", "accuracy", "margin", "eval_accuracy", "reward", "kl",
                    "completions/mean_length", "num_tokens",
                    "train_runtime"):
            if key in shown:
                parts.append(f"{key} {shown[key]:.4g}")
        line = " | ".join(parts)
        if self.training_bar is not None:
            self.training_bar.write(line)
        log.debug(line)


def use_compact_progress(trainer) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress())


def announce_parameters(model) -> dict[str, int]:
    from lmalign.models import count_parameters

    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s total (%.2f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1))
    return {"trainable_parameters": trainable, "total_parameters": total}


@contextmanager
def peak_memory(found: dict[str, float | None]):
    """Peak memory while the block runs, in MiB, into found["peak_memory_mib"].

    On a GPU: the CUDA allocator's peak. On a CPU, where torch keeps no allocator statistics:
    the growth of the process's resident memory over its level at the start (an earlier job in
    the same process may leave freed memory that a later one reuses). Linux keeps the peak
    itself (VmHWM, reset by writing 5 to /proc/self/clear_refs): exact and free. Where that
    cannot be reset, a thread samples the resident size every 20 ms, which cost up to a few
    percent of a tiny model's training speed (benchmarks/sft_throughput.py).
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        yield
        found["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return
    if not os.path.exists("/proc/self/status"):  # not Linux: no cheap resident-memory reading
        found["peak_memory_mib"] = None
        yield
        return
    start = _status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        with _sampled_peak() as peak:
            yield
        found["peak_memory_mib"] = (peak[0] - start) / 2**20
        return
    yield
    found["peak_memory_mib"] = (_status_bytes("VmHWM") - start) / 2**20


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


@contextmanager
def _sampled_peak():
    """The largest resident size seen every 20 ms while the block runs, in [0]."""
    peak, done = [_status_bytes("VmRSS")], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _status_bytes("VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], _status_bytes("VmRSS"))


def hold_stop_signals() -> None:
    """A stop signal that arrives before training begins (a worker loading its model) is held
    pending by the kernel until StopOnSignal takes the signals over when training begins; then
    training saves at its first step and stops, instead of the signal being lost."""
    signal.pthread_sigmask(signal.SIG_BLOCK, StopOnSignal.SIGNALS)


class StopOnSignal(TrainerCallback):
    """The signal policy (docs/design.md, Launch and signals): SIGTERM, SIGUSR1 or SIGUSR2
    (what SLURM and submitit send before a preemption or time limit) make every rank save a
    checkpoint at the next step boundary and stop. Ranks agree through an all-reduce, so a
    signal that reaches one rank stops them all together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self._previous = {}

    def _handle(self, number, _frame) -> None:
        self.received = number

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {n: signal.signal(n, self._handle) for n in self.SIGNALS}
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)  # one held comes now

    def on_train_end(self, args, state, control, **kwargs):
        for number, previous in self._previous.items():
            signal.signal(number, previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self._anyone_received(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def _anyone_received(self, args) -> bool:
        import torch
        import torch.distributed as dist

        flag = self.received is not None
        if dist.is_available() and dist.is_initialized():
            tensor = torch.tensor([int(flag)], device=args.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag


def train_and_save(trainer, config: Config, run_dir: Path) -> dict[str, Any]:
    """Train (resuming where a checkpoint exists), save final/, and say what it took."""
    parameters = announce_parameters(trainer.model)
    memory: dict[str, float | None] = {}
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    if trainer.is_fsdp_enabled and trainer.is_world_process_zero():
        # Sharded checkpoints hold tensors only; this lets models.loadable() rebuild a model.
        trainer.accelerator.unwrap_model(trainer.model).config.save_pretrained(
            run_dir / rundir.CHECKPOINTS)
    with peak_memory(memory):
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(config, run_dir))
    if stopper.stopped_at is not None:
        raise TrainingStopped(
            f"training stopped by a signal at step {stopper.stopped_at} after saving "
            f"{run_dir / rundir.CHECKPOINTS}/checkpoint-{stopper.stopped_at}; run the same "
            "command again to resume from it", stopper.received)
    save_final(trainer, run_dir)
    return {**parameters, **memory, **summary(trainer, result)}


def save_final(trainer, run_dir: Path) -> Path:
    """Model (or adapter) and tokenizer into final/, which appears only once complete."""
    final = run_dir / rundir.FINAL
    staging = run_dir / ".final.partial"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    if trainer.is_fsdp_enabled:
        # Checkpoints stay sharded (one file per rank, fast to save and resume from); final/ is
        # gathered into one model that loads anywhere.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # TRL's frozen copy for DPO's reference: not part of the result
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank takes part (sharded weights); the main one writes
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(staging))
        staging.rename(final)
        log.info("saved %s", final)
    trainer.accelerator.wait_for_everyone()
    return final


def summary(trainer, result) -> dict[str, Any]:
    metrics = dict(result.metrics)
    history = trainer.state.log_history
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
    runtime = metrics.get("train_runtime")
    found = {
        "global_step": trainer.state.global_step,
        "train_loss": metrics.get("train_loss"),
        "train_runtime_s": runtime,
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / runtime if tokens and runtime else None,
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in found.items()}
