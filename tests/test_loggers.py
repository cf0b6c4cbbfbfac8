"""Loggers write into the run directory with no network; secrets never land there."""

from __future__ import annotations

import pytest

from conftest import lmalign

pytestmark = pytest.mark.slow
SHORT = ("method.max_steps=4", "method.logging_steps=1", "method.save_steps=4",
         "dataset.max_samples=256", "dataset.max_eval_samples=32")


def test_tensorboard_writes_event_files(tmp_path, lmalign_cache):
    lmalign("run_name=tb", "logger=tensorboard", "eval=none", *SHORT, cwd=tmp_path,
            cache=lmalign_cache, check=True)
    events = list((tmp_path / "runs" / "tb" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_wandb_logs_offline_and_no_secret_lands_in_the_run_directory(tmp_path, lmalign_cache):
    sentinels = {"HF_TOKEN": "hf_SENTINELenv0001", "WANDB_API_KEY": "wandbSENTINEL0002",
                 "OPENAI_API_KEY": "sk-SENTINEL0003"}
    override_secret = "hf_SENTINELoverride0004"
    result = lmalign("run_name=secrets", "logger=wandb", "logger.mode=offline",
                     f"+secrets.HF_TOKEN={override_secret}", "eval.harness.tasks=[tiny_mc]",
                     "eval.harness.limit=8", *SHORT, cwd=tmp_path, cache=lmalign_cache, env=sentinels,
                     check=True)
    run_dir = tmp_path / "runs" / "secrets"
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "***" in (run_dir / "record.yaml").read_text()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        content = path.read_bytes()
        for secret in [*sentinels.values(), override_secret]:
            assert secret.encode() not in content, f"{secret} leaked into {path}"
    assert override_secret not in result.stdout + result.stderr
