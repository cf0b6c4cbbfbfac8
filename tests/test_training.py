"""Training behaviour users rely on: EOS is trained, batch splits don't change results, resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import lmalign, typed_config

SHORT = ("eval=none", "dataset.max_samples=512", "dataset.max_eval_samples=32")


def test_eos_is_never_masked_out_of_the_loss(tmp_path, lmalign_cache):
    """The classic pad == eos bug makes fine-tuned models ramble; check what the loss sees."""
    from trl import SFTConfig, SFTTrainer

    from lmalign import data, models
    from lmalign.methods.sft import _assistant_only_loss

    config = typed_config()
    path = models.resolve(config.model, str(lmalign_cache))
    tokenizer = models.load_tokenizer(path, config.model)
    train, _ = data.load_splits(config.dataset)
    trainer = SFTTrainer(
        model=models.load_model(path, config.model, config.hardware),
        args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                       activation_checkpointing=False,
                       assistant_only_loss=_assistant_only_loss(config, tokenizer),
                       max_length=config.method.max_length),
        train_dataset=train.select(range(8)), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        eos_positions = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
        reply_eos = eos_positions[-1]  # the user turn's <|end|> is prompt, not loss
        assert labels[reply_eos] == tokenizer.eos_token_id
        assert all(l == -100 for t, l in zip(ids, labels) if t == tokenizer.pad_token_id)
        assert labels[eos_positions[0]] == -100  # prompt tokens are not trained (assistant-only)


def _losses(name: str, tmp_path, cache, *overrides: str) -> list[float]:
    lmalign(f"run_name={name}", "method.max_steps=4", "method.logging_steps=1",
            "method.save_steps=4", *overrides, *SHORT, cwd=tmp_path, cache=cache, check=True)
    state = json.loads((tmp_path / "runs" / name / "checkpoints" / "checkpoint-4" /
                        "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.mark.slow
def test_batch_split_across_accumulation_and_processes_does_not_change_training(
        tmp_path, lmalign_cache):
    """Global batch 8 as 1 process x 8, 1 x 4 x accumulation 2, or 2 processes x 4 (DDP over
    gloo): the same losses step by step. A wrong split (accumulation 4, i.e. global 16) differs."""
    batch = ("method.global_batch_size=8",)
    reference = _losses("one_by_8", tmp_path, lmalign_cache, *batch,
                        "hardware.per_device_batch_size=8")
    assert len(reference) == 4
    accumulated = _losses("accumulate", tmp_path, lmalign_cache, *batch,
                          "hardware.per_device_batch_size=4")
    two_processes = _losses("ddp", tmp_path, lmalign_cache, *batch, "hardware=cpu_ddp",
                            "hardware.per_device_batch_size=4")
    assert accumulated == pytest.approx(reference, rel=1e-4)
    assert two_processes == pytest.approx(reference, rel=1e-4)
    wrong = _losses("wrong_split", tmp_path, lmalign_cache, "method.global_batch_size=16",
                    "hardware.per_device_batch_size=4")
    assert wrong != pytest.approx(reference, rel=1e-4)


def _final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _start_then_signal(tmp_path, cache, name: str, args, after_checkpoint: int, sig) -> int:
    """Start a run, send `sig` once checkpoint-<after_checkpoint> is complete; its exit code."""
    import os

    env = {**os.environ, "LMALIGN_CACHE": str(cache)}
    import signal

    # As from a terminal: a shell starts background jobs (CI's too) with SIGINT ignored, and
    # Python then never turns Ctrl-C into KeyboardInterrupt.
    process = subprocess.Popen([sys.executable, "-m", "lmalign", f"run_name={name}", *args],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    marker = tmp_path / "runs" / name / "checkpoints" / f"checkpoint-{after_checkpoint}" / \
        "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    _start_then_signal.stderr = stderr
    return process.returncode


@pytest.mark.slow
def test_sigterm_and_sigkill_runs_resume_to_the_weights_of_an_uninterrupted_run(
        tmp_path, lmalign_cache):
    import signal

    import torch

    args = ["method.max_steps=60", "method.save_steps=20", *SHORT]
    lmalign("run_name=straight", *args, cwd=tmp_path, cache=lmalign_cache, check=True)
    expected = _final_weights(tmp_path / "runs" / "straight")

    # SIGTERM (preemption): every rank saves a checkpoint at the next step and stops cleanly.
    code = _start_then_signal(tmp_path, lmalign_cache, "termed", args, 20, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "Traceback" not in _start_then_signal.stderr
    (line,) = [l for l in _start_then_signal.stderr.splitlines() if l.startswith("stopped: ")]
    saved = sorted(int(p.name.split("-")[1]) for p in
                   (tmp_path / "runs" / "termed" / "checkpoints").glob("checkpoint-*"))
    stopped_at = saved[-1]
    assert 20 < stopped_at < 60 and stopped_at % 20 and f"checkpoint-{stopped_at}" in line
    # SIGKILL: nothing to save; the newest complete checkpoint is where it resumes.
    assert _start_then_signal(tmp_path, lmalign_cache, "killed", args, 40, signal.SIGKILL) != 0
    # Ctrl-C: one line, 130 as a shell reports it, and the run says it was interrupted.
    code = _start_then_signal(tmp_path, lmalign_cache, "interrupted", args, 20, signal.SIGINT)
    assert code == 130 and "Traceback" not in _start_then_signal.stderr
    assert [l for l in _start_then_signal.stderr.splitlines()
            if l.startswith(("stopped:", "error:", "Traceback", "KeyboardInterrupt"))] == [
        "stopped: interrupted (Ctrl-C); run the same command again to resume from the newest "
        "complete checkpoint and skip the evaluations that are done"]
    assert json.loads((tmp_path / "runs" / "interrupted" / "run.json").read_text())[
        "status"] == "interrupted"

    # A checkpoint cut short on disk is reported by name and passed over for the one before it.
    weights_file = tmp_path / "runs" / "killed" / "checkpoints" / "checkpoint-40" / \
        "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100_000])

    for name, step in (("termed", stopped_at), ("killed", 20), ("interrupted", 20)):
        result = lmalign(f"run_name={name}", *args, cwd=tmp_path, cache=lmalign_cache,
                         check=True)
        log = result.stdout + result.stderr
        assert f"checkpoint-{step} (step {step})" in log
        if name == "killed":
            assert "skipping corrupt checkpoint" in log and "model.safetensors is truncated" in log
        weights = _final_weights(tmp_path / "runs" / name)
        for key, value in expected.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)
    record = json.loads((tmp_path / "runs" / "termed" / "run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["stopped", "done"]


def test_peak_memory_on_a_cpu_counts_an_allocation_freed_before_the_block_ends():
    """Linux's own high-water mark, reset at the start: a peak between two samples counts."""
    import torch

    from lmalign import training

    found: dict = {}
    with training.peak_memory(found):
        block = torch.ones(50 * 2**20)  # 200 MiB, written
        del block
    assert 190 < found["peak_memory_mib"] < 400, found
    # Where clear_refs cannot be written (some sandboxes), a sampling thread stands in.
    start = training._status_bytes("VmRSS")
    with training._sampled_peak() as peak:
        block = torch.ones(50 * 2**20)
        time.sleep(0.1)  # sampled every 20 ms
        del block
    assert 190 < (peak[0] - start) / 2**20 < 400
