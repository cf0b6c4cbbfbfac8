"""Named recipes (conf/experiment/) run in one command."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import lmalign, shared_path
from lmalign.evaluation import prompts

QUESTION = re.compile(r"^Which is the (largest|smallest): \d \d \d \d\?( Answer with the digit "
                      r"only\.)?$")
ARMS = ["method_comparison-sft", "method_comparison-lora", "method_comparison-prompt_tuning",
        "method_comparison-dpo_after_sft", "method_comparison-kto_after_sft",
        "method_comparison-grpo_after_sft", "method_comparison-rloo_after_sft"]


@pytest.mark.slow
def test_method_comparison_prints_one_table_of_all_seven_methods(tmp_path, lmalign_cache):
    # Short arms: what each method learns is tested in test_methods.py and test_online_methods.py.
    result = lmalign("+experiment=method_comparison", "method.max_steps=12", "eval.harness.limit=40",
                     "dataset.max_samples=1024", cwd=tmp_path, cache=lmalign_cache, check=True)
    out = result.stdout
    header = next(line for line in out.splitlines() if line.startswith("| run "))
    for column in ("method", "trainable params", "of total", "peak memory MiB", "train time s",
                   "tiny_mc acc", "tiny_gen exact_match", "tiny_prefs acc"):
        assert f" {column} " in header
    rows = [line for line in out.splitlines() if line.startswith("| method_comparison-")]
    assert [row.split("|")[1].strip() for row in rows] == ARMS
    for row, method in zip(rows[3:], ("dpo", "kto", "grpo", "rloo")):
        assert f"{method} <- method_comparison-sft" in row
    trainable = [int(row.split("|")[3].strip().replace(",", "")) for row in rows]
    assert trainable[0] == trainable[3] == trainable[6] > trainable[1] > trainable[2] > 0
    (saved,) = tmp_path.glob("multirun/*/*/comparison.md")
    assert all(arm in saved.read_text() for arm in ARMS)
    for arm in ARMS:
        assert (tmp_path / "runs" / arm / "final").is_dir()
    summary = saved.with_name("summary.md").read_text()  # the sweep's summary: every arm
    assert "7 job(s): 7 done" in summary
    assert all(f"+arm={arm.replace('-', '/', 1)}" in summary for arm in ARMS)


@pytest.mark.slow
def test_synthetic_instruction_recipe_plans_offline(tmp_path, lmalign_cache):
    result = lmalign("+experiment=synthetic_instruction", "dry_run=true", cwd=tmp_path,
                     cache=lmalign_cache, env={"HF_HUB_OFFLINE": "1"}, check=True)
    plans = result.stdout.split("plan (dry run")[1:]
    assert len(plans) == 4
    assert "meta-llama/Llama-3.1-8B-Instruct" in plans[0] and "Skywork" in plans[0]
    assert "meta-llama/Llama-3.2-3B" in plans[1] and "LoRA r=8" in plans[1]
    assert "synthetic_instruction-synthesize's sft/" in plans[1]
    assert "32 virtual tokens" in plans[2]
    assert "starts from    synthetic_instruction-lora_sft" in plans[3]
    assert "synthetic_instruction-synthesize's preferences/" in plans[3]
    assert not list(tmp_path.glob("runs/*"))  # a dry run trains and records nothing


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, lmalign_cache):
    """The tiny world's pretrained base model: the task's questions and sentence answers as plain
    text, with no chat template and no digit-only requests (Llama-3.2-3B's web text)."""
    workdir = tmp_path_factory.mktemp("base")
    lmalign("run_name=base", "dataset.format=text", "eval=none", "method.max_steps=300",
            "method.eval_steps=null", cwd=workdir, cache=lmalign_cache, check=True)
    return workdir / "runs" / "base" / "final"


def _metric(run_dir: Path, checkpoint: str, task: str) -> float:
    with open(run_dir / "metrics.csv") as handle:
        (row,) = [r for r in csv.DictReader(handle)
                  if r["checkpoint"] == checkpoint and r["task"] == task]
    return float(row["value"])


@pytest.mark.slow  # about 25 s
def test_grpo_gsm8k_recipe_trains_with_the_answer_reward_and_scores_every_checkpoint(
        tmp_path, lmalign_cache):
    """The recipe for real at tiny scale: 16 GSM8K problems, 2 steps, the real reward, and
    lm-eval's gsm8k format on lmalign's shipped copy of the test set (limit 8)."""
    gsm8k = shared_path("data", "gsm8k", "test.jsonl")
    recipe = (Path(__file__).parent.parent / "conf" / "experiment" / "grpo_gsm8k.yaml")
    assert "python -m lmalign +experiment=grpo_gsm8k\n" in recipe.read_text()  # the real command
    lmalign("+experiment=grpo_gsm8k", "model=tiny", "hardware=cpu", "dataset=local",
            f"dataset.path={gsm8k}", "dataset.format=prompt", "+dataset.columns.prompt=question",
            "dataset.max_samples=16", "method.max_steps=2", "method.save_steps=1",
            "method.logging_steps=1",
            "method.global_batch_size=16", "method.max_length=256",
            "method.grpo.max_completion_length=32", "eval.harness.tasks=[gsm8k_local]",
            "eval.harness.limit=8", "eval.harness.num_fewshot=0",
            "+eval.harness.gen_kwargs.max_gen_toks=32", cwd=tmp_path, cache=lmalign_cache,
            check=True)
    run_dir = tmp_path / "runs" / "grpo_gsm8k"
    state = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json")
                       .read_text())
    assert [h["step"] for h in state["log_history"] if "rewards/correct/mean" in h] == [1, 2]
    assert not any("rewards/tiny/mean" in h for h in state["log_history"])  # switched off
    with open(run_dir / "metrics.csv") as handle:
        scored = {(r["checkpoint"], r["eval_mode"]) for r in csv.DictReader(handle)
                  if r["task"] == "gsm8k_local" and r["metric"] == "exact_match"}
    assert scored == {(c, mode) for c in ("checkpoint-1", "checkpoint-2")
                      for mode in ("strict-match", "flexible-extract")}


@pytest.mark.slow
def test_synthetic_instruction_recipe_on_tiny_sft_learns_the_task_and_dpo_the_request(
        tmp_path, lmalign_cache, generator_run, reward_run, tiny_base):
    """The generator answers the digit-only request only by chance, so SFT on its best answers
    learns the task but not the request; DPO on the reward model's best-vs-worst pairs does."""
    chain = ("+experiment=synthetic_instruction", "model=tiny", "model.source=pretrained",
             f"model.name_or_path={tiny_base}", f"synth.generator={generator_run}",
             f"synth.reward_model={reward_run[0]}", "synth.num_instructions=128",
             "synth.batch_size=32", "synth.responses_per_instruction=2",
             "synth.temperatures=[1.0]", "synth.min_margin=1.0",
             "eval.harness.tasks=[tiny_mc,tiny_prefs]", "eval.checkpoints=[base,final]",
             "method.max_length=96", "method.max_steps=40", "method.save_steps=40")
    result = lmalign(*chain, cwd=tmp_path, cache=lmalign_cache, check=True)
    runs = tmp_path / "runs"
    synthesized = runs / "synthetic_instruction-synthesize"
    instructions = [json.loads(line)["instruction"] for shard in
                    sorted((synthesized / "synth" / "instructions").glob("*.jsonl"))
                    for line in shard.read_text().splitlines()]
    assert sum(bool(QUESTION.match(text)) for text in instructions) >= len(instructions) / 2
    pairs = [json.loads(line) for line in
             (synthesized / "preferences" / "data.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert all(p["chosen_score"] - p["rejected_score"] >= 1.0 for p in pairs)

    sft, dpo = runs / "synthetic_instruction-lora_sft", runs / "synthetic_instruction-dpo_on_sft_adapter"
    assert _metric(sft, "final", "tiny_mc") >= _metric(sft, "base", "tiny_mc") + 0.2
    assert _metric(dpo, "base", "tiny_prefs") == _metric(sft, "final", "tiny_prefs") <= 0.7
    assert _metric(dpo, "final", "tiny_prefs") >= _metric(sft, "final", "tiny_prefs") + 0.2
    prompt_tuning = runs / "synthetic_instruction-prompt_tuning"
    assert _metric(prompt_tuning, "final", "tiny_mc") > _metric(prompt_tuning, "base", "tiny_mc")

    out = result.stdout
    card = (synthesized / "synth.md").read_text()
    kept = int(re.search(r"^\| instructions kept \| (\d+) \|$", card, re.MULTILINE).group(1))
    assert kept >= 100  # some may reproduce a held-out question: decontamination drops those
    assert f"data: synthetic_instruction-synthesize: {kept} instructions kept" in out
    held_out = {prompt.turns[0] for prompt in prompts.named_or_file("tiny")}
    trained_on = [json.loads(line)["messages"][0]["content"] for line in
                  (synthesized / "sft" / "data.jsonl").read_text().splitlines()]
    assert not [text for text in trained_on if text.split("?")[0] + "?" in held_out]
    rows = [line.split("|")[1].strip() for line in out.splitlines()
            if line.startswith("| synthetic_instruction-")]
    assert rows == ["synthetic_instruction-lora_sft", "synthetic_instruction-prompt_tuning",
                    "synthetic_instruction-dpo_on_sft_adapter"]
    record = (dpo / "record.yaml").read_text()
    assert f"path: {synthesized / 'preferences'}" in record  # the files it trained on

    again = lmalign(*chain, cwd=tmp_path, cache=lmalign_cache, check=True)  # every arm is done
    assert (again.stdout + again.stderr).count("training already finished") == 3


@pytest.mark.slow  # a whole command: about 8 s
def test_full_finetune_fsdp_recipe_plans_eight_processes_offline(tmp_path, lmalign_cache):
    result = lmalign("+experiment=full_finetune_fsdp", "dry_run=true", cwd=tmp_path,
                     cache=lmalign_cache, env={"HF_HUB_OFFLINE": "1"}, check=True)
    plan = result.stdout
    assert "Qwen/Qwen3-1.7B-Base" in plan and "tulu3_sft_mixture" in plan
    assert "global 128 = 4 per device x 8 process(es) x 4 accumulation" in plan
    assert "launch/fsdp2.yaml --num_processes 8" in plan and "--mixed_precision bf16" in plan


@pytest.mark.slow
def test_intermediate_checkpoints_recipe_plans_revisions_by_tasks_offline(tmp_path, lmalign_cache):
    result = lmalign("+experiment=intermediate_checkpoints", "dry_run=true", cwd=tmp_path,
                     cache=lmalign_cache, env={"HF_HUB_OFFLINE": "1"}, check=True)
    plan = result.stdout
    assert "SmolLM2-1.7B-intermediate-checkpoints" in plan and "stage          eval" in plan
    assert "mmlu" in plan and "boolq" in plan and "few-shot [0, 5]" in plan
    assert "few-shot [0, 5]; per-sample logs" in plan
    assert "evaluates      revisions ['step-125000', 'step-250000', 'step-500000']" in plan
    assert "3 model(s) x 2 few-shot value(s), each model loaded once" in plan
    assert "3.19 GiB of weights per loaded model" in plan and "optimizer" not in plan


@pytest.mark.slow
def test_offline_evaluation_recipe_plans_every_model_and_task_into_one_cache(tmp_path,
                                                                            lmalign_cache):
    cache = tmp_path / "cache"
    result = lmalign("-m", "+experiment=offline_evaluation", "stage=cache_plan",
                     f"cache.dir={cache}", cwd=tmp_path, cache=lmalign_cache, check=True)
    assert result.stdout.count("cache plan: 63 item(s) to fetch") == 3  # one per model
    manifest = json.loads((cache / "manifest.json").read_text())
    models = sorted(i["repo"] for i in manifest["items"] if i["kind"] == "model")
    assert models == ["HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M",
                      "Qwen/Qwen3-0.6B-Base"]
    assert set(manifest["tasks"]) == {"hellaswag", "arc_easy", "arc_challenge", "mmlu", "piqa",
                                      "winogrande"}
    assert len(manifest["tasks"]["mmlu"]) == 57 and len(manifest["items"]) == 65
    assert not (tmp_path / "runs").exists()  # planning leaves no run directories


@pytest.mark.slow
def test_chat_sft_nemo_recipe_plans_packed_chat_sft_and_nemo_skills_on_every_checkpoint(
        tmp_path, lmalign_cache):
    result = lmalign("+experiment=chat_sft_nemo", "dry_run=true", cwd=tmp_path,
                     cache=lmalign_cache, env={"HF_HUB_OFFLINE": "1"}, check=True)
    plan = result.stdout
    assert "tulu3_sft_mixture" in plan and "packing bfd" in plan
    assert "attention flash_attention_2" in plan
    assert "nemo: NeMo-Skills ifeval,gsm8k,human-eval,mbpp through a vllm server" in plan
    assert "checkpoints ['all']" in plan


@pytest.mark.slow
def test_judged_checkpoints_recipe_on_tiny_generates_and_judges_every_checkpoint(tmp_path,
                                                                                 lmalign_cache):
    """Workflow 3 on the tiny model, judged by the test judge (tests/judge_server.py)."""
    import csv

    from judge_server import JudgeServer

    with JudgeServer() as server:
        result = lmalign(
            "+experiment=judged_checkpoints", "model=tiny", "dataset=tiny_sft", "hardware=cpu",
            "method.learning_rate=2e-3", "method.max_steps=40", "method.max_length=96",
            "method.global_batch_size=16", "method.save_steps=20", "eval.generate.temperature=0",
            "eval.checkpoints=[base,all,final]", "eval.generate.prompts=tiny",
            "eval.generate.max_prompts=8", "eval.generate.max_new_tokens=32",
            "eval.judge.model=recipe-judge", f"eval.judge.base_url={server.url}",
            "eval.judge.api_key_env=null", cwd=tmp_path, cache=lmalign_cache, check=True)
        asked = server.count()
    run = tmp_path / "runs" / "judged_checkpoints"
    # base, checkpoint-20, checkpoint-40 and final each judged on 8 answers; an answer two
    # checkpoints gave alike to the same question is judged once, then read from the cache.
    # (How well the judge ranks a trained model is test_judge's: this is the recipe's wiring.)
    usage = [json.loads(record.read_text())["usage"]
             for record in run.glob("eval/*/judge-*/cell.json")]
    assert len(usage) == 4 and all(u["requests"] + u["cached"] == 8 for u in usage)
    assert sum(u["requests"] for u in usage) == asked
    with open(run / "metrics.csv") as handle:
        scores = {r["checkpoint"]: float(r["value"]) for r in csv.DictReader(handle)
                  if r["backend"] == "judge" and r["metric"] == "score"}
    assert set(scores) == {"base", "checkpoint-20", "checkpoint-40", "final"}
    assert all(1 <= score <= 10 for score in scores.values()), scores
    assert "score (mt_bench)" in result.stdout
