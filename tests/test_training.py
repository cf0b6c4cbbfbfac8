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


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path, lmalign_cache):
    import os

    args = ["run_name=killed", "method.max_steps=300", "method.save_steps=20", *SHORT]
    env = {**os.environ, "LMALIGN_CACHE": str(lmalign_cache)}
    process = subprocess.Popen([sys.executable, "-m", "lmalign", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "runs" / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "checkpoint-40" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before checkpoint-40"
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert not (tmp_path / "runs" / "killed" / "final").exists()

    result = lmalign(*args, cwd=tmp_path, cache=lmalign_cache, check=True)
    log = result.stdout + result.stderr
    assert "resuming from" in log and "checkpoint-" in log
    run_dir = tmp_path / "runs" / "killed"
    state = json.loads((checkpoints / "checkpoint-300" / "trainer_state.json").read_text())
    assert state["global_step"] == 300 and (run_dir / "final" / "model.safetensors").exists()
    record = json.loads((run_dir / "run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["running", "done"]
    first_logged = min(h["step"] for h in state["log_history"] if "loss" in h)
    assert first_logged <= 40  # the resumed state carries the history of the first attempt
