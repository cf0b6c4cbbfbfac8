"""Checkpoint x few-shot evaluation, resumable cells, and stage=report over sweeps and runs."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import REPO, lmalign, lmalign_background, typed_config
from lmalign import report
from lmalign.evaluation import cells, harness
from lmalign.evaluation.cells import Target

TASK = ("eval.harness.tasks=[tiny_mc]",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lmalign_cache):
    """A tiny SFT run with checkpoints 10, 20, 30 and final/."""
    home = tmp_path_factory.mktemp("report")
    lmalign("stage=train", "run_name=r", "method.max_steps=30", "method.save_steps=10",
            "eval=none", "dataset.max_samples=1024", cwd=home, cache=lmalign_cache, check=True)
    return home


def _complete_cells(run_dir):
    return sorted(p.parent for p in (run_dir / "eval").glob(f"*/*/{cells.CELL_RECORD}"))


@pytest.mark.slow
def test_checkpoints_by_fewshot_resume_after_a_kill_and_equal_the_lm_eval_cli(
        trained, lmalign_cache):
    run_dir = trained / "runs" / "r"
    request = ("stage=eval", "run_name=r", "eval.checkpoints=[all,final]",
               "eval.harness.num_fewshot=[0,2]", "eval.harness.limit=20", *TASK)
    killed = lmalign_background(*request, cwd=trained, cache=lmalign_cache,
                                log=trained / "killed.log")
    deadline = time.monotonic() + 300
    while len(_complete_cells(run_dir)) < 2 and killed.poll() is None:
        assert time.monotonic() < deadline, (trained / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = {cell: (cell / cells.CELL_RECORD).read_text() for cell in _complete_cells(run_dir)}
    assert 2 <= len(before) < 8, "the evaluation was not killed midway"

    again = lmalign(*request, cwd=trained, cache=lmalign_cache, check=True)
    evaluated = re.findall(r"eval (\S+): tiny_mc, (\d)-shot ->", again.stdout + again.stderr)
    assert len(evaluated) == 8 - len(before)  # only the missing cells
    after = _complete_cells(run_dir)
    assert len(after) == 8  # checkpoint-10/20/30 and final x 0/2-shot
    assert all((cell / cells.CELL_RECORD).read_text() == text for cell, text in before.items())
    with open(run_dir / cells.METRICS_CSV) as handle:
        rows = [r for r in csv.DictReader(handle) if r["metric"] == "acc"]
    assert {(r["checkpoint"], r["num_fewshot"]) for r in rows} == {
        (label, shots) for label in ("checkpoint-10", "checkpoint-20", "checkpoint-30", "final")
        for shots in ("0", "2")}
    assert (run_dir / report.PLOTS_DIR / "tiny_mc_acc_none.png").stat().st_size > 1000

    # The same cell through lm-eval's own command line, with its own defaults (with the chat
    # template, few-shot examples are earlier turns).
    config = typed_config(*request)
    cell = cells.cell_dir(run_dir, Target("checkpoint-20", 20, ""), harness.settings(config.eval, 2))
    ours = json.loads((cell / cells.CELL_RECORD).read_text())["rows"]
    cli = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={run_dir / 'checkpoints' / 'checkpoint-20'},dtype=float32",
         "--tasks", "tiny_mc", "--include_path", str(REPO / "lmalign" / "tasks"),
         "--num_fewshot", "2", "--limit", "20", "--seed", "0", "--batch_size", "32",
         "--device", "cpu", "--apply_chat_template", "--output_path", str(trained / "cli")],
        capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    written = json.loads(next((trained / "cli").rglob("results_*.json")).read_text())
    assert [r["value"] for r in ours if r["metric"] == "acc"] == pytest.approx(
        [written["results"]["tiny_mc"]["acc,none"]], abs=1e-9)


@pytest.mark.slow
def test_a_sweep_is_collated_with_its_failed_job_named(trained, lmalign_cache):
    run_dir = trained / "runs" / "r"
    request = ("stage=eval", "run_name=r", "eval.harness.limit=10", *TASK)
    # Job 3 (checkpoint 20, 2-shot) fails: something that is not a cell sits where its cell goes.
    settings = harness.settings(typed_config(*request, "eval.harness.num_fewshot=2").eval, 2)
    blocker = cells.cell_dir(run_dir, Target("checkpoint-20", 20, ""), settings)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a cell")

    result = lmalign("-m", *request, "eval.checkpoints=10,20", "eval.harness.num_fewshot=0,2",
                     "hydra.sweep.dir=sweep", cwd=trained, cache=lmalign_cache)
    assert result.returncode == 1
    assert re.search(r"job 3 \(.*eval.checkpoints=20 eval.harness.num_fewshot=2\): failed",
                     result.stdout), result.stdout[-3000:]
    sweep = trained / "sweep"
    with open(sweep / report.SUMMARY_CSV) as handle:
        rows = [r for r in csv.DictReader(handle) if r["metric"] == "acc"]
    assert sorted((r["job"], r["checkpoint"], r["num_fewshot"]) for r in rows) == [
        ("0", "checkpoint-10", "0"), ("1", "checkpoint-10", "2"), ("2", "checkpoint-20", "0")]
    summary = (sweep / report.SUMMARY_MD).read_text()
    assert "4 job(s): 3 done, 1 failed." in summary
    assert "| 3 | stage=eval run_name=r eval.harness.limit=10 eval.harness.tasks=[tiny_mc] " \
           "eval.checkpoints=20 eval.harness.num_fewshot=2 | failed (" in summary
    assert (sweep / report.PLOTS_DIR / "tiny_mc_acc_none.png").exists()
    lmalign("stage=report", "report.dir=sweep", "report.pack=true", cwd=trained,
            cache=lmalign_cache, check=True)
    with zipfile.ZipFile(sweep / report.RESULTS_ZIP) as packed:
        names = packed.namelist()
    assert "summary.csv" in names and "plots/tiny_mc_acc_none.png" in names
    assert len([n for n in names if "/results_" in n]) == 3  # the three jobs' cells, no more
    assert not [n for n in names if n.endswith(".safetensors")]

    # Collation by hand, on the run directory: every cell of the run, whoever evaluated it.
    blocker.unlink()
    lmalign("stage=report", "run_name=r", cwd=trained, cache=lmalign_cache, check=True)
    with open(run_dir / report.SUMMARY_CSV) as handle:
        collated = {run_dir / r["cell"] for r in csv.DictReader(handle)}
    assert collated == set(_complete_cells(run_dir)) and len(collated) >= 3


@pytest.mark.slow
def test_a_grouped_task_is_collated_with_its_subtasks(tmp_path, lmalign_cache):
    lmalign("stage=eval", "run_name=g", "eval.checkpoints=[base]",
            "eval.harness.tasks=[tiny_suite]", "eval.harness.limit=10", cwd=tmp_path,
            cache=lmalign_cache, check=True)
    run_dir = tmp_path / "runs" / "g"
    with open(run_dir / cells.METRICS_CSV) as handle:
        groups = {r["task"]: r["group"] for r in csv.DictReader(handle)}
    assert groups == {"tiny_suite": "", "tiny_mc": "tiny_suite", "tiny_prefs": "tiny_suite"}
    lmalign("stage=report", "run_name=g", cwd=tmp_path, cache=lmalign_cache, check=True)
    summary = (run_dir / report.SUMMARY_MD).read_text()
    assert "## tiny_suite: acc" in summary and "## tiny_suite: subtasks by acc" in summary
    assert sorted(p.name for p in (run_dir / report.PLOTS_DIR).iterdir()) == [
        "tiny_suite_acc_none.png"]


def test_a_group_keeps_its_score_and_gets_a_sorted_subtask_table():
    rows = [{"task": "mmlu", "group": None, "metric": "acc", "eval_mode": "none", "value": 0.5,
             "checkpoint": "final", "step": 30, "num_fewshot": 5}]
    for subject, value in (("mmlu_anatomy", 0.4), ("mmlu_astronomy", 0.7), ("mmlu_virology", 0.5)):
        rows.append({**rows[0], "task": subject, "group": "mmlu", "value": value})
    text = report.summary_markdown([report.Job("0", [], None, "done")], rows, [], REPO)
    assert "## mmlu: acc" in text and "| - | final | 30 | 0.5000 |" in text
    table = text[text.index("## mmlu: subtasks"):]
    assert [line.split("|")[1].strip() for line in table.splitlines()[4:7]] == [
        "mmlu_astronomy", "mmlu_virology", "mmlu_anatomy"]
    assert "## mmlu_anatomy" not in text  # subtasks live in the group's table only


def test_judge_rows_show_their_interval_and_the_invalid_count_as_a_count():
    base = {"task": "mt_bench", "group": None, "backend": "judge", "eval_mode": "mt_bench",
            "checkpoint": "final", "step": 30, "num_fewshot": None}
    rows = [{**base, "metric": "score", "value": 8.125, "ci_low": 7.5, "ci_high": 8.6875},
            {**base, "metric": "invalid", "value": 2.0, "ci_low": None, "ci_high": None}]
    text = report.summary_markdown([report.Job("0", [], None, "done")], rows, [], REPO)
    assert "| - | final | 30 | 8.1250 [7.50, 8.69] |" in text
    assert "| - | final | 30 | 2 |" in text


def test_a_revision_names_its_step():
    from lmalign.evaluation.targets import step_of as _step_of

    assert [_step_of(r) for r in ("step-125000", "stage1-step10000-tokens41B", "1000", "main",
                                  "v1.0")] == [125000, 10000, 1000, None, None]
