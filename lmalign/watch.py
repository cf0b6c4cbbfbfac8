"""stage=watch: evaluate a training run's checkpoints as they appear, beside the training.

The watcher polls the run directory, evaluates each new complete checkpoint (and final/ at the
end) in the cells of the run directory (docs/design.md, Run directory), rebuilds metrics.csv and
the plots, and exits when the training run has ended. It writes only cells, metrics.csv,
plots/ and its own log, never the training's run.json, so it can be killed and restarted at
any time: finished cells are skipped.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from lmalign import evaluation, rundir
from lmalign.errors import JobFailed
from lmalign.evaluation import cells, targets
from lmalign.evaluation.cells import Target
from lmalign.schema import Config, ModelConfig

log = logging.getLogger(__name__)
ENDED = ("done", "failed", "failed (user error)", "stopped", "interrupted")


def watch(config: Config, run_dir: Path, model: ModelConfig, training: Config,
          overrides: list[str] | None = None) -> None:
    """model: the model the run trains from; training: the run's recorded config. overrides:
    the watcher's own command-line overrides, passed on to the evaluation jobs it submits
    (watch.submit_to)."""
    reported: set[str] = set()
    submitter = Submitter(config.watch.submit_to, run_dir, overrides or []) \
        if config.watch.submit_to else None
    idle_since = time.monotonic()
    log.info("watching %s: every new checkpoint is evaluated on %s%s",
             run_dir, evaluation.describe(config.eval),
             f", each as its own job (hydra/launcher={config.watch.submit_to})"
             if submitter else "")
    while True:
        ended = _training_ended(run_dir)  # read before listing: nothing can appear after it
        pending = [t for t in targets.saved_targets(run_dir) if not _done(t, config, run_dir)]
        if submitter:
            if submitter.collect():
                _rebuild(run_dir)
            pending = [t for t in pending if t.label not in submitter.failed]
            for target in pending:
                submitter.submit(target)
        else:
            for target in pending:
                _evaluate(target, config, run_dir, model, reported)
            if pending:
                _rebuild(run_dir)
        if pending:
            idle_since = time.monotonic()
        _report_rotated(run_dir, training.method.save_steps, training.method.save_total_limit,
                        reported)
        if ended and not pending and not (submitter and submitter.running):
            _rebuild(run_dir)
            if submitter and submitter.failed:
                raise JobFailed(f"the evaluation jobs of {', '.join(sorted(submitter.failed))} "
                                f"failed; their logs: {run_dir / 'watch'}/<checkpoint>.log")
            log.info("training %s and every checkpoint is evaluated: %s", ended,
                     run_dir / cells.METRICS_CSV)
            return
        if time.monotonic() - idle_since > 60 * config.watch.idle_timeout_minutes:
            log.warning("no new checkpoint for %g minutes and training has not ended: stopping "
                        "(watch.idle_timeout_minutes); run the same command to watch again",
                        config.watch.idle_timeout_minutes)
            return
        time.sleep(config.watch.poll_seconds)


class Submitter:
    """Each checkpoint's evaluation as `python -m lmalign stage=eval` on a cluster launcher: the
    same submission, records and failure reports as any sweep. Each submission waits for its
    job in a child process; its output goes to <run>/watch/<checkpoint>.log."""

    PASSED_OVER = ("stage", "run_name", "eval.checkpoints", "watch.", "secrets.", "+secrets.")

    def __init__(self, launcher: str, run_dir: Path, overrides: list[str]) -> None:
        self.launcher = launcher
        self.run_dir = run_dir
        self.overrides = [o for o in overrides if not o.startswith(self.PASSED_OVER)]
        self.running: dict[str, subprocess.Popen] = {}
        self.failed: set[str] = set()

    def submit(self, target: Target) -> None:
        if target.label in self.running or target.label in self.failed:
            return
        folder = self.run_dir / "watch" / target.label
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "lmalign", *self.overrides, "stage=eval",
                   f"run_name={self.run_dir.name}", f"runs_root={self.run_dir.parent}",
                   f"eval.checkpoints={target.label}", f"hydra/launcher={self.launcher}",
                   f"hydra.sweep.dir={folder}"]
        with open(self.log_of(target.label), "ab") as output:
            self.running[target.label] = subprocess.Popen(command, stdout=output,
                                                          stderr=subprocess.STDOUT)
        log.info("%s: submitted its evaluation (hydra/launcher=%s); log: %s", target.label,
                 self.launcher, self.log_of(target.label))

    def collect(self) -> list[str]:
        """The checkpoints whose submissions ended since the last call."""
        ended = [label for label, process in self.running.items() if process.poll() is not None]
        for label in ended:
            process = self.running.pop(label)
            if process.returncode != 0:
                self.failed.add(label)
                log.warning("%s: its evaluation job failed (exit %d); log: %s", label,
                            process.returncode, self.log_of(label))
        return ended

    def log_of(self, label: str) -> Path:
        return self.run_dir / "watch" / f"{label}.log"


def _training_ended(run_dir: Path) -> str | None:
    """How the training ended, or None while it runs. final/ alone is not the end: a train_eval
    run evaluates after saving it, but the watcher has nothing more to wait for then."""
    if rundir.final_dir(run_dir):
        return "finished"
    status = rundir.read_record(run_dir).get("status")
    return status if status in ENDED else None


def _done(target: Target, config: Config, run_dir: Path) -> bool:
    return not evaluation.missing_cells([target], config, run_dir)


def _evaluate(target: Target, config: Config, run_dir: Path, model: ModelConfig,
              reported: set[str]) -> None:
    try:
        evaluation.evaluate([target], config, run_dir, model)
    except (OSError, ValueError) as exc:
        if Path(target.path).exists():
            raise
        # save_total_limit removed it while it was loading or being evaluated.
        reported.add(target.label)
        log.warning("skipped %s: training removed it while it was being evaluated "
                    "(save_total_limit) [%s]", target.label, type(exc).__name__)


def _report_rotated(run_dir: Path, save_steps: int, save_total_limit: int | None,
                    reported: set[str]) -> None:
    """Checkpoints that training saved and removed (save_total_limit) before they were seen."""
    if save_steps <= 0:
        return
    present = {step for step, _ in rundir.complete_checkpoints(run_dir)}
    evaluated = {int(p.name.split("-")[1]) for p in (run_dir / "eval").glob("checkpoint-*")}
    newest = max(present | evaluated, default=0)
    for step in range(save_steps, newest, save_steps):
        label = f"checkpoint-{step}"
        if step not in present and step not in evaluated and label not in reported:
            reported.add(label)
            log.warning("skipped %s: training removed it before it could be evaluated "
                        "(save_total_limit=%s)", label, save_total_limit)


def _rebuild(run_dir: Path) -> None:
    from lmalign import report

    rows = cells.rebuild_metrics_csv(run_dir)
    report.write_plots(rows, run_dir / report.PLOTS_DIR)
