"""method=grpo and method=rloo as a user runs them: from the tiny SFT run, rewarded for the reply
the question asks for, they learn what the SFT data mostly ignored; bad inputs stop them with one
line each."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import lmalign


def _metric(run_dir: Path, checkpoint: str, task: str) -> float:
    with open(run_dir / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["checkpoint"] == checkpoint
                and r["task"] == task and r["metric"] == "acc"]
    assert len(rows) == 1, rows
    return float(rows[0]["value"])


@pytest.fixture(scope="module")
def runs(default_run, tmp_path_factory) -> Path:
    """A directory holding the README's SFT run as runs/sft, for model.init_from=sft."""
    root = tmp_path_factory.mktemp("online")
    shutil.copytree(default_run[1], root / "runs" / "sft")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])  # rloo: 40 steps (tiny_rloo.yaml), grpo 80
def test_training_on_its_own_samples_learns_the_request_the_sft_data_mostly_ignored(
        method, runs, lmalign_cache):
    lmalign(f"run_name={method}", f"method={method}", "dataset=tiny_prompts",
            "model.init_from=sft", "eval.harness.tasks=[tiny_prefs,tiny_mc]", cwd=runs,
            cache=lmalign_cache, check=True)
    run_dir = runs / "runs" / method
    steps = sorted(run_dir.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name[11:]))
    history = json.loads((steps[-1] / "trainer_state.json").read_text())["log_history"]
    reward = [h["rewards/tiny/mean"] for h in history if "rewards/tiny/mean" in h]
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    print(f"{method}: reward over the first 10 steps {first:.3f}, the last 10 {last:.3f}")
    assert last >= first + 0.2, (first, last)
    assert all("kl" in h for h in history if "rewards/tiny/mean" in h)  # beta > 0: KL logged
    assert _metric(run_dir, "final", "tiny_prefs") >= _metric(run_dir, "base", "tiny_prefs") + 0.2
    assert _metric(run_dir, "final", "tiny_mc") >= _metric(run_dir, "base", "tiny_mc") - 0.05
    logged = list((run_dir / "checkpoints" / "completions").glob("completions_*.parquet"))
    assert logged  # TRL's completion log: prompt, completion, each reward, advantage
    assert (run_dir / "final" / "model.safetensors").exists()


def test_grpo_bad_inputs_stop_with_one_line_each_before_anything_loads(tmp_path, lmalign_cache):
    result = lmalign("method=grpo", "dataset=tiny_sft", "method.rewards.tiny._target_=nope.x",
                     "method.grpo.num_generations=3", cwd=tmp_path, cache=lmalign_cache)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 3, result.stderr
    assert any("method=grpo generates its own completions from prompts" in e for e in errors)
    assert any("cannot import nope" in e for e in errors)
    assert any("method.global_batch_size=64: counts completions, which come in groups of "
               "method.grpo.num_generations=3" in e for e in errors)
    assert not (tmp_path / "runs").exists()
