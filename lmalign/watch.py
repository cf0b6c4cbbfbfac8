"""stage=watch: evaluate a training run's checkpoints as they appear, beside the training.

The watcher polls the run directory, evaluates each new complete checkpoint (and final/ at the
end) in the cells of DESIGN's run directory, rebuilds metrics.csv and the plots, and exits when
the training run has ended. It writes only cells, metrics.csv and plots/, never the training's
run.json, so it can be killed and restarted at any time: finished cells are skipped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from lmalign import rundir
from lmalign.errors import UserError, problem
from lmalign.evaluation import cells, harness
from lmalign.evaluation.cells import Target
from lmalign.schema import Config, ModelConfig

log = logging.getLogger(__name__)
ENDED = ("done", "failed", "failed (user error)", "stopped", "interrupted")


def watch(config: Config, run_dir: Path, model: ModelConfig) -> None:
    """model: the model the run trains (from its own record)."""
    settings = _training_settings(run_dir)
    harness.check_tasks(config.eval.tasks)
    reported: set[str] = set()
    idle_since = time.monotonic()
    log.info("watching %s: every new checkpoint is evaluated on %s, few-shot %s",
             run_dir, ",".join(config.eval.tasks), config.eval.fewshot_values)
    while True:
        ended = _training_ended(run_dir)  # read before listing: nothing can appear after it
        targets = [Target(path.name, step, str(path))
                   for step, path in rundir.complete_checkpoints(run_dir)]
        final = rundir.final_dir(run_dir)
        if final:
            step = (rundir.read_record(run_dir).get("train") or {}).get("global_step")
            targets.append(Target("final", step, str(final)))
        pending = [t for t in targets if not _done(t, config, run_dir)]
        for target in pending:
            _evaluate(target, config, run_dir, model, reported)
        if pending:
            idle_since = time.monotonic()
            _rebuild(run_dir)
        _report_rotated(run_dir, settings, reported)
        if ended and not pending:
            _rebuild(run_dir)
            log.info("training %s and every checkpoint is evaluated: %s", ended,
                     run_dir / cells.METRICS_CSV)
            return
        if time.monotonic() - idle_since > 60 * config.watch.idle_timeout_minutes:
            log.warning("no new checkpoint for %g minutes and training has not ended: stopping "
                        "(watch.idle_timeout_minutes); run the same command to watch again",
                        config.watch.idle_timeout_minutes)
            return
        time.sleep(config.watch.poll_seconds)


def _training_settings(run_dir: Path) -> dict:
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        raise UserError(problem("run_name", run_dir.name, f"no training run in {run_dir} (its "
                                ".hydra/config.yaml is written when training starts)",
                                "the run_name of a training run that has started",
                                "start the training first, then stage=watch run_name=<it>"))
    return OmegaConf.to_container(OmegaConf.load(saved).method, resolve=False)


def _training_ended(run_dir: Path) -> str | None:
    """How the training ended, or None while it runs. final/ alone is not the end: a train_eval
    run evaluates after saving it, but the watcher has nothing more to wait for then."""
    if rundir.final_dir(run_dir):
        return "finished"
    status = rundir.read_record(run_dir).get("status")
    return status if status in ENDED else None


def _done(target: Target, config: Config, run_dir: Path) -> bool:
    return all(cells.is_complete(cell, need_samples=config.eval.log_samples)
               for cell in harness.requested_cells([target], config.eval, run_dir))


def _evaluate(target: Target, config: Config, run_dir: Path, model: ModelConfig,
              reported: set[str]) -> None:
    try:
        harness.evaluate([target], config.eval, run_dir, model, config.hardware)
    except (OSError, ValueError) as exc:
        if Path(target.path).exists():
            raise
        # save_total_limit removed it while it was loading or being evaluated.
        reported.add(target.label)
        log.warning("skipped %s: training removed it while it was being evaluated "
                    "(save_total_limit) [%s]", target.label, type(exc).__name__)


def _report_rotated(run_dir: Path, method: dict, reported: set[str]) -> None:
    """Checkpoints that training saved and removed (save_total_limit) before they were seen."""
    save_steps = method.get("save_steps")
    if not isinstance(save_steps, int) or save_steps <= 0:
        return
    present = {step for step, _ in rundir.complete_checkpoints(run_dir)}
    evaluated = {int(p.name.split("-")[1]) for p in (run_dir / "eval").glob("checkpoint-*")}
    newest = max(present | evaluated, default=0)
    for step in range(save_steps, newest, save_steps):
        label = f"checkpoint-{step}"
        if step not in present and step not in evaluated and label not in reported:
            reported.add(label)
            log.warning("skipped %s: training removed it before it could be evaluated "
                        "(save_total_limit=%s)", label, method.get("save_total_limit"))


def _rebuild(run_dir: Path) -> None:
    from lmalign import report

    rows = cells.rebuild_metrics_csv(run_dir)
    report.write_plots(rows, run_dir / report.PLOTS_DIR)
