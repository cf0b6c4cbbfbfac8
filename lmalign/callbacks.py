"""Hydra callbacks: a sweep's job records and its comparison table, free of secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from lmalign import secrets

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


# The sweep in progress and the error of the job in progress (a user error is caught inside the
# job, so Hydra reports it as completed).
current_sweep: Path | None = None
job_error: list[str] = []
job_cells: list[str] = []  # the cells the job in progress asked for, relative to its run dir


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs a multirun makes from its overrides, expanded by Hydra's own basic sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _collated(config: Any) -> bool:
    """Dry runs and the cache stages have no results to collate."""
    return not config.get("dry_run") and not str(config.get("stage")).startswith("cache_")


class SweepJobsCallback(Callback):
    """<sweep>/jobs/: the expected jobs, then one record per started job (overrides, run
    directory, outcome), so stage=report names failed and missing jobs. Hydra's sweeper raises
    on a failed job before on_multirun_end, so collation runs from the CLI (lmalign.cli)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global current_sweep
        if not _collated(config):
            return
        from lmalign import report, rundir

        current_sweep = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        found = dict(config.get("secrets") or {})
        rundir.atomic_write_json(current_sweep / report.JOBS_DIR / report.EXPECTED_JOBS, [
            secrets.redact_overrides(job, found)
            for job in expand_sweep(list(config.hydra.overrides.task))])

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        job_error.clear()
        job_cells.clear()
        if current_sweep is not None:
            redact_sweep_record(current_sweep, config)
        self._record(config, "running")

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        failed = job_return.status == JobStatus.FAILED
        error = (f"{type(job_return._return_value).__name__}: {job_return._return_value}"
                 if failed else "; ".join(job_error) or None)
        self._record(config, "failed" if failed or job_error else "done", error)

    @staticmethod
    def _record(config: Any, status: str, error: str | None = None) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN or not _collated(config):
            return
        if os.environ.get("SLURM_PROCID", "0") != "0":
            return  # a multi-node job's other nodes: the main node records it
        # A job may run in another process (a SLURM job): the sweep directory comes with it.
        sweep = current_sweep or Path(OmegaConf.select(config, "hydra.sweep.dir"))
        write_job_record(sweep, config.hydra.job.num, secrets.redact_overrides(
                             config.hydra.overrides.task, dict(config.get("secrets") or {})),
                         Path(config.hydra.runtime.output_dir).resolve(), status, error,
                         list(job_cells), _cluster_log())


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
