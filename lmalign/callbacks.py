"""Hydra callbacks: a sweep's job records and its comparison table, free of secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from lmalign import adapters, secrets


class ComparisonTableCallback(Callback):
    """At the end of a comparison sweep, one table across its runs (printed and in the sweep dir)."""

    def __init__(self) -> None:
        self.run_dirs: list[Path] = []

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        from lmalign import rundir

        if rundir.has_config_record(run_dir) and not config.get("dry_run"):
            self.run_dirs.append(run_dir)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.run_dirs:
            return
        from lmalign import report

        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        table = report.write_comparison(self.run_dirs, sweep_dir)
        print(f"\n{config.get('comparison') or 'comparison'} "
              f"({sweep_dir / report.COMPARISON_FILE}):\n{table}\n", flush=True)


def sweep_overrides(config: Any) -> list[str]:
    """What the sweeper expands into jobs: a recipe's hydra.sweeper.params, then the command
    line (as Hydra's basic sweeper orders them). As typed: an override may hold
    ${hydra:job.num}, which only a job can resolve."""
    params = OmegaConf.select(config, "hydra.sweeper.params")
    recipe = [f"{key}={value}" for key, value in
              (OmegaConf.to_container(params, resolve=False) if params else {}).items()]
    return recipe + OmegaConf.to_container(config.hydra.overrides.task, resolve=False)


def _collated(config: Any) -> bool:
    """Dry runs and the cache stages have no results to collate."""
    return not config.get("dry_run") and not str(config.get("stage")).startswith("cache_")


class SweepJobsCallback(Callback):
    """Before a sweep starts: every job's config is checked, and training jobs that would share
    a run directory are found; a sweep with any problem is refused whole (each job refuses
    itself when it starts). Then <sweep>/jobs/: the expected jobs, then one record per started
    job (overrides, run directory, outcome), so stage=report names failed and missing jobs.
    Hydra's sweeper raises on a failed job before on_multirun_end, so collation runs from the
    CLI (lmalign.cli), told which sweep by the command's outcomes folder (lmalign.outcome)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from lmalign import config_tree, outcome, report, rundir

        jobs = adapters.expand_sweep(sweep_overrides(config))
        sweep = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        new_dir = None if sweep.exists() else sweep
        try:
            composed = config_tree.sweep_jobs(config, jobs)
        except Exception:  # a job that does not compose: the launcher raises, main diagnoses
            outcome.refuse({}, [], new_dir)
            return
        problems = config_tree.sweep_problems(composed)
        if problems:  # a callback cannot stop Hydra (it warns and goes on): each job refuses
            # itself, and the sweep directory Hydra is about to make goes again if it is new.
            outcome.refuse(problems, [number for number, _ in composed], new_dir)
            return
        if not _collated(config):
            return
        found = dict(config.get("secrets") or {})
        rundir.atomic_write_json(sweep / report.JOBS_DIR / report.EXPECTED_JOBS,
                                 [secrets.redact_overrides(job, found) for job in jobs])
        outcome.collate_later(sweep)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        from lmalign import outcome

        if config.hydra.mode == RunMode.MULTIRUN:
            if outcome.refusal(str(config.hydra.job.num)) is not None:
                return  # a refused sweep keeps no record
            redact_sweep_record(Path(OmegaConf.select(config, "hydra.sweep.dir")), config)
        self._record(config, "running")

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        from lmalign import outcome

        if config.hydra.mode != RunMode.MULTIRUN or outcome.refusal(
                str(config.hydra.job.num)) is not None:
            return
        ended = outcome.read(str(config.hydra.job.num))
        cells = ended.cells if ended else []
        if job_return.status == JobStatus.FAILED:
            self._record(config, "failed", f"{type(job_return._return_value).__name__}: "
                                           f"{job_return._return_value}", cells)
        elif ended and ended.status == "user error":
            self._record(config, "failed", "; ".join(ended.problems), cells)
        elif ended and ended.status == "stopped":
            self._record(config, "failed", f"stopped: {ended.stopped}", cells)
        else:
            self._record(config, "done", None, cells)

    @staticmethod
    def _record(config: Any, status: str, error: str | None = None,
                cells: list[str] | None = None) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN or not _collated(config):
            return
        if os.environ.get("SLURM_PROCID", "0") != "0":
            return  # a multi-node job's other nodes: the main node records it
        # A job may run in another process (a SLURM job): the sweep directory comes with it.
        sweep = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        write_job_record(sweep, config.hydra.job.num, secrets.redact_overrides(
                             config.hydra.overrides.task, dict(config.get("secrets") or {})),
                         Path(config.hydra.runtime.output_dir).resolve(), status, error,
                         list(cells or []), _cluster_log())


def _cluster_log() -> str | None:
    """The job's log when it runs on a cluster (submitit), where lmalign.log is not all of it."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return None
    import submitit

    return str(submitit.JobEnvironment().paths.stderr)


def redact_sweep_record(sweep: Path, config: Any) -> None:
    """Hydra's sweeper saves <sweep>/multirun.yaml, overrides and all, after the sweep starts."""
    path = Path(sweep) / "multirun.yaml"
    if path.exists():
        text = path.read_text()
        cleaned = secrets.redact(text, secrets.secret_values(dict(config.get("secrets") or {})))
        if cleaned != text:
            path.write_text(cleaned)


def write_job_record(sweep: Path, number: int, overrides: list[str], run_dir: Path | None,
                     status: str, error: str | None, cells: list[str], log: str | None) -> None:
    from lmalign import report, rundir

    rundir.atomic_write_json(sweep / report.JOBS_DIR / f"{number}.json", {
        "num": number, "overrides": overrides, "run_dir": str(run_dir) if run_dir else None,
        "status": status, "error": error, "cells": cells, "log": log})


def record_lost_job(sweep: Path, number: int, overrides: list[str], error: str, log: str) -> None:
    """A cluster job that ended without finishing its record (killed, cancelled, timed out)."""
    from lmalign import report

    path = sweep / report.JOBS_DIR / f"{number}.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    if found.get("status") in ("done", "failed"):
        return  # the job said how it ended
    run_dir = found.get("run_dir")
    write_job_record(sweep, number, overrides, Path(run_dir) if run_dir else None, "failed",
                     error, found.get("cells", []), log)
