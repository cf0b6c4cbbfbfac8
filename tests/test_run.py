"""The default run, end to end: `python -m lmalign` trains the tiny model and evaluates it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES, lmalign, lmalign_in_process

pytestmark = pytest.mark.slow
DESIGN_COLUMNS = ["checkpoint", "step", "backend", "task", "metric", "num_fewshot", "eval_mode",
                  "value", "stderr"]


@pytest.fixture(scope="module")
def demo(default_run):
    return default_run


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _value(rows, checkpoint, task, metric, shots="0"):
    (row,) = [r for r in rows if (r["checkpoint"], r["task"], r["metric"], r["num_fewshot"])
              == (checkpoint, task, metric, shots)]
    return float(row["value"])


def test_training_beats_the_untrained_model_by_30_points(demo):
    result, run_dir, _ = demo
    rows = _metrics(run_dir)
    base, final = _value(rows, "base", "tiny_mc", "acc"), _value(rows, "final", "tiny_mc", "acc")
    assert abs(base - 0.25) <= 0.10, f"untrained model should be near chance, got {base}"
    assert final - base >= 0.30, (base, final)
    assert _value(rows, "final", "tiny_gen", "exact_match") > _value(rows, "base", "tiny_gen",
                                                                     "exact_match") + 0.30
    table = result.stdout
    assert "task" in table and "base" in table and "final" in table and "delta" in table
    assert any(line.startswith("tiny_mc") and "+0." in line for line in table.splitlines())


def test_run_directory_holds_the_documented_files(demo):
    _, run_dir, _ = demo
    for relative in ("record.yaml", "lmalign.log", "run.json", "metrics.csv", "final/config.json",
                     "final/model.safetensors", "final/tokenizer.json",
                     "checkpoints/checkpoint-250/trainer_state.json",
                     "checkpoints/checkpoint-500/trainer_state.json"):
        assert (run_dir / relative).exists(), relative
    assert not (run_dir / ".hydra").exists()  # the record is lmalign's, written after validation
    for checkpoint in ("base", "final"):
        (cell,) = (run_dir / "eval" / checkpoint).iterdir()
        assert (cell / "cell.json").exists() and list(cell.glob("results_*.json"))
    with open(run_dir / "metrics.csv") as handle:
        assert next(csv.reader(handle))[:len(DESIGN_COLUMNS)] == DESIGN_COLUMNS
    for row in _metrics(run_dir):
        assert 0.0 <= float(row["value"]) <= 1.0
    assert {r["step"] for r in _metrics(run_dir)} == {"0", "500"}


def test_run_record(demo):
    _, run_dir, _ = demo
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "done"
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "lm_eval"):
        assert record["versions"][package]
    assert record["hardware_seen"]["cpu_count"] >= 1
    attempt = record["attempts"][0]
    assert attempt["argv"][-1] == "run_name=demo" and attempt["started"] and attempt["ended"]
    assert record["train"]["train_tokens_per_s"] > 0 and record["train"]["global_step"] == 500
    assert record["train"]["trainable_parameters"] == record["train"]["total_parameters"] > 0


def test_parameters_changed(demo, lmalign_cache):
    from safetensors.torch import load_file

    _, run_dir, _ = demo
    (base_dir,) = (lmalign_cache / "embedded").glob("tiny-*")
    before, after = load_file(base_dir / "model.safetensors"), load_file(
        run_dir / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert len(changed) == len(before)


def _eos_rate(model_dir: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmalign import tinytask

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = tinytask.generate("test", 200)
    longest_answer = max(len(tokenizer(r["answer"])["input_ids"]) for r in records)
    stopped = 0
    for start in range(0, len(records), 50):
        batch = records[start:start + 50]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                 tokenize=False, add_generation_prompt=True)
                   for r in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**encoded, do_sample=False, max_new_tokens=4 * longest_answer,
                                 pad_token_id=tokenizer.pad_token_id)
        generated = out[:, encoded["input_ids"].shape[1]:]
        stopped += int((generated == tokenizer.eos_token_id).any(dim=1).sum())
    return stopped / len(records)


def test_trained_model_learns_to_stop(demo, lmalign_cache):
    _, run_dir, _ = demo
    (base_dir,) = (lmalign_cache / "embedded").glob("tiny-*")
    assert _eos_rate(run_dir / "final") >= 0.90
    assert _eos_rate(base_dir) < 0.10


def test_rerunning_the_same_command_skips_finished_work(demo, lmalign_cache):
    _, run_dir, workdir = demo
    before = (run_dir / "metrics.csv").read_text()
    result = lmalign("run_name=demo", cwd=workdir, cache=lmalign_cache, check=True)
    log = result.stdout + result.stderr
    assert "training already finished" in log
    assert "eval base: all cells done, skipping" in log and "eval final: all cells done" in log
    assert (run_dir / "metrics.csv").read_text() == before
    assert len(json.loads((run_dir / "run.json").read_text())["attempts"]) >= 2


def test_stage_eval_on_the_run_adds_only_the_missing_cells(demo, lmalign_cache):
    _, run_dir, workdir = demo
    training_record = (run_dir / "record.yaml").read_text()
    result = lmalign("stage=eval", "run_name=demo", "eval.harness.tasks=[tiny_mc]", "eval.harness.limit=40",
                     "eval.harness.num_fewshot=[0,2]", "eval.checkpoints=[checkpoint-250,final]",
                     "eval.harness.log_samples=true", cwd=workdir, cache=lmalign_cache, check=True)
    rows = _metrics(run_dir)
    assert _value(rows, "checkpoint-250", "tiny_mc", "acc", "2") >= 0
    assert {r["num_fewshot"] for r in rows if r["checkpoint"] == "final"} == {"0", "2"}
    assert [r for r in rows if r["checkpoint"] == "base"]  # earlier cells are kept
    (samples_cell,) = [c for c in (run_dir / "eval" / "final").iterdir()
                       if "fs2" in c.name]
    assert list(samples_cell.glob("samples_tiny_mc_*.jsonl"))
    assert (run_dir / "record.yaml").read_text() == training_record
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "done" and record["attempts"][0]["stage"] == "train_eval"
    (attempt,) = [a for a in record["attempts"] if a["stage"] == "eval"]
    assert attempt["status"] == "done" and "eval.harness.num_fewshot=[0,2]" in attempt["overrides"]
    assert "eval final" in (run_dir / "lmalign-eval.log").read_text()
    assert "training" not in result.stderr.split("run directory")[-1].split("eval ")[0]


def test_changing_training_settings_of_an_existing_run_is_refused(demo, lmalign_cache):
    _, run_dir, workdir = demo
    record = (run_dir / "record.yaml").read_text()
    result = lmalign("run_name=demo", "method.learning_rate=0.1", cwd=workdir,
                     cache=lmalign_cache)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: method.learning_rate=0.1" in result.stderr and "new run_name" in result.stderr
    assert (run_dir / "record.yaml").read_text() == record


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def test_refused_commands_leave_every_file_of_a_trained_run_as_it_was(demo, tmp_path,
                                                                      lmalign_cache):
    from test_cli import ERROR_CASES

    _, run_dir, _ = demo
    shutil.copytree(run_dir, tmp_path / "runs" / "demo")
    before = _files(tmp_path / "runs")

    results = [lmalign_in_process(*overrides, "run_name=demo", cwd=tmp_path,
                                  cache=lmalign_cache, env=env) for overrides, env in ERROR_CASES]
    for (overrides, _), result in zip(ERROR_CASES, results):
        assert result.returncode == 2, (overrides, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "error: " in result.stderr
    assert _files(tmp_path / "runs") == before
    assert not (tmp_path / "outputs").exists()
    # The record still says what the run was: the first command is accepted as it was, and
    # the run is still reported as done.
    again = lmalign("run_name=demo", cwd=tmp_path, cache=lmalign_cache, check=True)
    assert "training already finished" in again.stdout + again.stderr
    report = lmalign("stage=report", "run_name=demo", cwd=tmp_path, cache=lmalign_cache,
                     check=True)
    assert "from 1 of 1 job(s)" in report.stdout and "failed" not in report.stdout


def test_a_run_recorded_in_the_old_layout_works_with_eval_watch_report_and_init_from(
        demo, tmp_path, lmalign_cache):
    _, run_dir, _ = demo
    old = tmp_path / "runs" / "old"
    shutil.copytree(FIXTURES / "old_layout_run", old)
    shutil.copytree(run_dir / "final", old / "final")  # the same command trained these weights

    def run(*overrides):
        result = lmalign(*overrides, cwd=tmp_path, cache=lmalign_cache, check=True)
        return result.stdout + result.stderr

    evaluated = run("stage=eval", "run_name=old")
    assert "eval base: all cells done, skipping" in evaluated
    assert "eval final: all cells done, skipping" in evaluated
    assert "every checkpoint is evaluated" in run("stage=watch", "run_name=old")
    assert "4 result row(s) from 1 of 1 job(s)" in run("stage=report", "run_name=old")
    assert not (old / "record.yaml").exists()  # a later stage never rewrites a run's record
    assert json.loads((old / "run.json").read_text())["status"] == "done"
    child = run("run_name=child", "model.init_from=old", "method.max_steps=2", "eval=none")
    assert "starting from" in child and "old/final" in child
    assert (tmp_path / "runs" / "child" / "final" / "model.safetensors").exists()


def test_cells_of_different_settings_are_never_read_as_one(demo, tmp_path, lmalign_cache):
    """A limit=4 evaluation beside the full one: metrics.csv, the printed table and
    summary.md keep them apart and say which is which."""
    _, run_dir, _ = demo
    shutil.copytree(run_dir, tmp_path / "runs" / "demo")
    result = lmalign("stage=eval", "run_name=demo", "eval.checkpoints=[final]",
                     "eval.harness.limit=4", cwd=tmp_path, cache=lmalign_cache, check=True)
    rows = [r for r in _metrics(tmp_path / "runs" / "demo") if r["checkpoint"] == "final"
            and r["task"] == "tiny_mc" and r["metric"] == "acc"]
    settings = [r["settings"] for r in rows if r["num_fewshot"] == "0"]
    assert "limit=4" in settings and "limit=null" in settings
    # Other tests evaluate the shared demo run too: every row still says what sets it apart.
    distinct = {(r["num_fewshot"], r["settings"]) for r in rows}
    assert len(distinct) == len(rows) == len({r["settings_hash"] for r in rows})
    assert "settings" in result.stdout and "limit=4" in result.stdout
    lmalign("stage=report", "run_name=demo", cwd=tmp_path, cache=lmalign_cache, check=True)
    summary = (tmp_path / "runs" / "demo" / "summary.md").read_text()
    assert "[limit=4]" in summary and "[limit=null]" in summary
    # Each row names the command that wrote its cell: the later stage=eval, or the training.
    with open(tmp_path / "runs" / "demo" / "summary.csv") as handle:
        written_by = {r["settings"]: r["overrides"] for r in csv.DictReader(handle)
                      if r["checkpoint"] == "final" and r["task"] == "tiny_mc"}
    assert "stage=eval" in written_by["limit=4"] and "eval.harness.limit=4" in written_by["limit=4"]
    assert "stage=eval" not in written_by["limit=null"]


def test_the_default_run_prints_no_noise_a_user_cannot_act_on(demo):
    """Run outside a git repository on a CPU: no git complaint from lm-eval's environment
    record, no DeepSpeed notice that it found no GPU."""
    output = demo[0].stdout + demo[0].stderr
    assert "fatal: not a git repository" not in output
    assert "Setting accelerator to CPU" not in output
