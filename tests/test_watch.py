"""stage=watch evaluates a training run's checkpoints as they appear, once each, across restarts."""

from __future__ import annotations

import json
import logging
import signal
import time

import pytest

from conftest import lmalign, lmalign_background
from lmalign import report, watch
from lmalign.evaluation import cells

WATCH = ("stage=watch", "run_name=w", "eval.harness.tasks=[tiny_mc]", "eval.harness.limit=40",
         "watch.poll_seconds=0.5")


def _cells(run_dir) -> dict[str, str]:
    return {record.parent.parent.name: record.read_text()
            for record in (run_dir / "eval").glob(f"*/*/{cells.CELL_RECORD}")}


def _wait(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_watcher_beside_training_evaluates_every_checkpoint_once_across_a_restart(
        tmp_path, lmalign_cache):
    run_dir = tmp_path / "runs" / "w"
    training = lmalign_background(
        "stage=train", "run_name=w", "method.max_steps=60", "method.save_steps=15", "eval=none",
        "dataset.max_samples=4096", cwd=tmp_path, cache=lmalign_cache, log=tmp_path / "train.log")
    _wait(lambda: (run_dir / "record.yaml").exists(), "training to start")
    first = lmalign_background(*WATCH, cwd=tmp_path, cache=lmalign_cache,
                               log=tmp_path / "watch1.log")
    _wait(lambda: _cells(run_dir) or first.poll() is not None, "a first evaluated checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = _cells(run_dir)
    restarted_at = time.time()

    second = lmalign(*WATCH, cwd=tmp_path, cache=lmalign_cache, timeout=600, check=True)
    assert training.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    log = second.stdout + second.stderr
    assert "training finished and every checkpoint is evaluated" in log

    labels = ["checkpoint-15", "checkpoint-30", "checkpoint-45", "checkpoint-60", "final"]
    assert sorted(_cells(run_dir)) == sorted(labels)  # one complete cell each
    assert all(_cells(run_dir)[label] == text for label, text in done_before.items())
    evaluated_again = [label for label in labels if f"eval {label}: tiny_mc" in log]
    assert sorted(evaluated_again) == sorted(set(labels) - set(done_before))
    appeared_while_watching = [
        label for label in labels[:-1]
        if (run_dir / "checkpoints" / label / "trainer_state.json").stat().st_mtime > restarted_at]
    assert appeared_while_watching, "training had finished before the watcher restarted"
    assert (run_dir / report.PLOTS_DIR / "tiny_mc_acc_none.png").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"  # training's own


def test_checkpoints_removed_before_they_were_evaluated_are_reported_as_skipped(tmp_path, caplog):
    run_dir = tmp_path / "run"
    for step in (30, 40):  # save_total_limit=2 removed 10 and 20
        (run_dir / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (run_dir / "eval" / "checkpoint-10" / "harness-fs0-0").mkdir(parents=True)  # evaluated
    reported: set[str] = set()
    with caplog.at_level(logging.WARNING):
        watch._report_rotated(run_dir, 10, 2, reported)
        watch._report_rotated(run_dir, 10, 2, reported)
    assert [r.getMessage() for r in caplog.records] == [
        "skipped checkpoint-20: training removed it before it could be evaluated "
        "(save_total_limit=2)"]  # once, however often the watcher looks
