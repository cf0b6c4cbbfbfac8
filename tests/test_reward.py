"""method=reward and eval=reward: a reward model trained on tiny_prefs scores what tiny_prefs
prefers, on held-out pairs and on an SFT model's own fresh answers; a reward model is evaluated by
eval=reward alone."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import lmalign, lmalign_in_process, typed_config
from lmalign import models, tinytask
from lmalign.methods import reward


def _rows(run_dir: Path, checkpoint: str) -> dict[str, dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return {r["metric"]: r for r in csv.DictReader(handle)
                if r["checkpoint"] == checkpoint and r["backend"] == "reward"}


def _errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("reward")


@pytest.fixture(scope="module")
def reward_run(reward_run, runs):
    """The session's reward run, copied here (tests below evaluate it further)."""
    shutil.copytree(reward_run[0], runs / "runs" / "rm")
    return runs / "runs" / "rm", reward_run[1]


@pytest.mark.slow
def test_a_tiny_reward_model_ranks_held_out_pairs_and_a_rerun_skips(reward_run, runs,
                                                                    lmalign_cache):
    run_dir, log = reward_run
    final, base = _rows(run_dir, "final"), _rows(run_dir, "base")
    assert float(final["pairwise_accuracy"]["value"]) >= 0.9
    assert 0.25 <= float(base["pairwise_accuracy"]["value"]) <= 0.75  # a new head: chance
    assert float(final["margin"]["value"]) > 1.0
    assert models.is_reward_model(run_dir / "final")
    scores = (Path(run_dir) / final["pairwise_accuracy"]["cell"] / "scores.jsonl").read_text()
    assert len(scores.splitlines()) == 400  # tiny_prefs' held-out split, every pair once
    records = sorted(run_dir.glob("eval/*/reward-*/cell.json"))
    written = [p.stat().st_mtime_ns for p in [*records, run_dir / "final" / "model.safetensors"]]
    again = lmalign_in_process("run_name=rm", "method=reward", "dataset=tiny_prefs",
                               "eval=reward", cwd=runs, cache=lmalign_cache)
    assert again.returncode == 0, again.stderr
    assert [p.stat().st_mtime_ns for p in [*records, run_dir / "final" / "model.safetensors"]] \
        == written  # nothing trained or scored again


def _fresh_pairs(sft_final: Path, path: Path) -> int:
    """The SFT model's own greedy answers to test-split questions it never saw, against the bare
    digit it named: chosen is what tiny_prefs prefers (the digit only when asked for)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_final)
    policy = AutoModelForCausalLM.from_pretrained(sft_final).eval()
    lines = []
    for index, record in enumerate(tinytask.generate("test", 40)):
        instructed = index % 2 == 1
        question = f"{record['prompt']} {tinytask.DIGIT_ONLY}" if instructed else record["prompt"]
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = policy.generate(**ids, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                  skip_special_tokens=True).strip()
        digit = re.findall(r"\d", answer)
        if not digit or answer == digit[-1]:
            continue
        sentence, bare = answer, digit[-1]
        chosen, rejected = (bare, sentence) if instructed else (sentence, bare)
        lines.append(json.dumps({"prompt": messages,
                                 "chosen": [{"role": "assistant", "content": chosen}],
                                 "rejected": [{"role": "assistant", "content": rejected}]}))
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


@pytest.mark.slow
def test_the_reward_model_prefers_what_tiny_prefs_prefers_on_an_sft_models_fresh_answers(
        reward_run, default_run, runs, tmp_path, lmalign_cache):
    run_dir, _ = reward_run
    pairs = tmp_path / "fresh.jsonl"
    assert _fresh_pairs(default_run[1] / "final", pairs) >= 30
    lmalign("stage=eval", "run_name=rm", "eval=reward", f"eval.reward.pairs={pairs}",
            "eval.checkpoints=[final]", cwd=runs, cache=lmalign_cache, check=True)
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv"))
            if r["task"] == "fresh" and r["metric"] == "pairwise_accuracy"]
    assert len(rows) == 1 and float(rows[0]["value"]) >= 0.9


@pytest.mark.slow
def test_other_backends_refuse_a_reward_model_and_eval_reward_refuses_a_language_model(
        reward_run, default_run, runs, lmalign_cache):
    refused = lmalign_in_process("stage=eval", "run_name=rm", "eval=harness", cwd=runs,
                                 cache=lmalign_cache)
    assert refused.returncode == 2, refused.stderr
    lines = _errors(refused)
    assert len(lines) == 1 and "final" in lines[0] and "is a reward model" in lines[0] \
        and "fix: eval=reward" in lines[0], refused.stderr
    shutil.copytree(default_run[1], runs / "runs" / "sft", dirs_exist_ok=True)
    refused = lmalign_in_process("stage=eval", "run_name=sft", "eval=reward",
                                 "eval.checkpoints=[final]", cwd=runs, cache=lmalign_cache)
    assert refused.returncode == 2 and "is a language model, not a reward model" in \
        refused.stderr, refused.stderr


def test_every_wrong_reward_setting_is_one_line_before_anything_loads(tmp_path, lmalign_cache):
    result = lmalign_in_process(
        "method=reward", "dataset=tiny_sft", "eval=[harness,reward]", "method.peft=prompt_tuning",
        "eval.reward.pairs=nope.jsonl", cwd=tmp_path, cache=lmalign_cache)
    lines = _errors(result)
    assert result.returncode == 2 and len(lines) == 4, result.stderr
    assert any(line.startswith("error: dataset='tiny_sft'") for line in lines)
    assert any(line.startswith("error: method.peft='prompt_tuning'") for line in lines)
    assert any("generates nothing" in line and "fix: eval=reward" in line for line in lines)
    assert any(line.startswith("error: eval.reward.pairs='nope.jsonl'") for line in lines)
    result = lmalign_in_process("eval=reward", cwd=tmp_path, cache=lmalign_cache)
    assert result.returncode == 2 and "method=reward" in _errors(result)[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()


def test_a_lora_reward_model_trains_its_adapter_and_score_head_only(tmp_path, lmalign_cache):
    config = typed_config("method=reward", "dataset=tiny_prefs", "method.peft=lora", "eval=none",
                          "method.max_steps=4", "dataset.max_samples=128",
                          "method.eval_steps=null", f"cache.build_dir={lmalign_cache}")
    trainer = reward.build(config, tmp_path, models.starting_point(config))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert any("lora_" in n for n in changed) and any("score" in n for n in changed)
    assert all("lora_" in n or "score" in n for n in changed), changed
    trainer.save_model(str(tmp_path / "adapter"))
    assert models.is_reward_model(tmp_path / "adapter")
