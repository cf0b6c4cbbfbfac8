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


@pytest.mark.slow
def test_batch_split_does_not_change_training(tmp_path, lmalign_cache):
    """global batch 32 as 32x1 or 8x4 (accumulation): the same losses step by step."""
    losses = {}
    for per_device in (32, 8):
        name = f"split{per_device}"
        lmalign(f"run_name={name}", f"hardware.per_device_batch_size={per_device}",
                "method.max_steps=4", "method.logging_steps=1", "method.save_steps=4", *SHORT,
                cwd=tmp_path, cache=lmalign_cache, check=True)
        state = json.loads((tmp_path / "runs" / name / "checkpoints" / "checkpoint-4" /
                            "trainer_state.json").read_text())
        losses[per_device] = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses[32]) == 4
    assert losses[32] == pytest.approx(losses[8], rel=1e-4)


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
