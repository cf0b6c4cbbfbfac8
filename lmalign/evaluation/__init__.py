"""Evaluation backends and the cells they write (DESIGN, Run directory).

`harness` (lm-evaluation-harness, in this process or its workers) and `nemo` (NeMo-Skills through
an inference server). Runs, sweeps and the watcher go through these three functions alike.
"""

from __future__ import annotations

from pathlib import Path

from lmalign.evaluation.cells import Target
from lmalign.schema import EvalConfig


def check(evaluation: EvalConfig) -> None:
    """Before anything trains or loads: the tasks exist, the backend is installed."""
    if evaluation.backend == "nemo":
        from lmalign.evaluation import nemo

        nemo.check(evaluation)
    else:
        from lmalign.evaluation import harness

        harness.check_tasks(evaluation.tasks)


def requested_cells(targets: list[Target], evaluation: EvalConfig, run_dir: Path,
                    processes: int = 1) -> list[Path]:
    if evaluation.backend == "nemo":
        from lmalign.evaluation import nemo

        return nemo.requested_cells(targets, evaluation, run_dir)
    from lmalign.evaluation import harness

    return harness.requested_cells(targets, evaluation, run_dir, processes)


def describe(evaluation: EvalConfig) -> str:
    if evaluation.backend == "nemo":
        return f"NeMo-Skills {evaluation.benchmark_spec} ({evaluation.server} server)"
    return f"{','.join(evaluation.tasks)}, few-shot {evaluation.fewshot_values}"
