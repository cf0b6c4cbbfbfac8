"""method=grpo and method=rloo as a user runs them: from the tiny SFT run, rewarded for the reply
the question asks for, they learn what the SFT data mostly ignored; bad inputs stop them with one
line each."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas
import pytest

from conftest import lmalign, typed_config
from lmalign.errors import UserError


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
    logged = sorted((run_dir / "checkpoints" / "completions").glob("completions_*.parquet"))
    assert len(logged) >= len(reward)  # every step: prompt, completion, each reward, advantage
    table = pandas.read_parquet(logged[-1])
    assert {"prompt", "completion", "tiny", "advantage"} <= set(table.columns)
    assert table["tiny"].mean() == pytest.approx(reward[-1])  # the last step's batch, as logged
    assert (run_dir / "final" / "model.safetensors").exists()


@pytest.mark.slow  # about 20 s, with the session's reward model
def test_a_reward_model_scores_completions_beside_the_rule_and_the_weights_sum(
        reward_run, tmp_path, lmalign_cache):
    lmalign("run_name=rm_reward", "method=grpo", "dataset=tiny_prompts", "method.max_steps=1",
            "method.save_steps=1", "eval=none", "+method.rewards.rm={_target_: "
            f"lmalign.rewards.reward_model, weight: 0.5, model: '{reward_run[0]}'}}",
            cwd=tmp_path, cache=lmalign_cache, check=True)
    state = tmp_path / "runs" / "rm_reward" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    (logged,) = [h for h in json.loads(state.read_text())["log_history"] if "reward" in h]
    assert logged["rewards/rm/std"] > 0  # the reward model tells completions apart
    assert logged["reward"] == pytest.approx(logged["rewards/tiny/mean"]
                                             + 0.5 * logged["rewards/rm/mean"], abs=1e-5)


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


def test_vllm_generation_is_refused_on_a_cpu_profile_and_a_server_needs_its_address():
    with pytest.raises(UserError) as caught:
        typed_config("method=rloo", "dataset=tiny_prompts", "method.rloo.vllm_mode=server",
                     check_environment=True)
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "method.rloo.vllm_mode='server'", "method.rloo.vllm_server_base_url=None"]
    assert "vLLM generates on GPUs and hardware=cpu trains on the CPU" in \
        caught.value.problems[0]
