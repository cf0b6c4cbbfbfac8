"""Evaluation backends and the cells they write (docs/design.md, Evaluation backends).

`harness` (lm-evaluation-harness, in this process or its workers) and `nemo` (NeMo-Skills through
an inference server). `train_eval`, `stage=eval`, the watcher and the evaluation jobs it submits
all go through `check`, `requested_cells` and `evaluate` here, so they find the same cells.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmalign.evaluation.cells import Target
from lmalign.schema import Config, EvalConfig, ModelConfig


def check(evaluation: EvalConfig) -> None:
    """Before anything trains or loads: the tasks exist, the backend is installed."""
    if evaluation.backend == "nemo":
        from lmalign.evaluation import nemo

        nemo.check(evaluation)
    else:
        from lmalign.evaluation import harness

        harness.check_tasks(evaluation.tasks)


def requested_cells(targets: list[Target], config: Config, run_dir: Path) -> list[Path]:
    """The cells these targets need. The process count is part of a few-shot cell's identity
    (it changes which examples each request sees), so it comes from the hardware profile."""
    if config.eval.backend == "nemo":
        from lmalign.evaluation import nemo

        return nemo.requested_cells(targets, config.eval, run_dir)
    from lmalign import launch
    from lmalign.evaluation import harness

    return harness.requested_cells(targets, config.eval, run_dir,
                                   launch.evaluation_processes(config.hardware))


def evaluate(targets: list[Target], config: Config, run_dir: Path, model: ModelConfig) -> None:
    """Evaluate every missing cell of these targets. model: the model the run started from (a
    checkpoint's base, for adapters and tokenizers)."""
    from lmalign import launch

    if config.eval.backend == "nemo":  # the server takes the GPUs; ns runs on the CPU
        from lmalign.evaluation import nemo

        nemo.evaluate(targets, config.eval, run_dir, model, config.hardware, config.cache.dir)
    elif launch.evaluation_processes(config.hardware) > 1:
        from pydantic import TypeAdapter

        launch.evaluate_in_workers(config, run_dir, {
            "targets": [dataclasses.asdict(t) for t in targets],
            "model": TypeAdapter(ModelConfig).dump_python(model, mode="json")})
    else:
        from lmalign.evaluation import harness

        harness.evaluate(targets, config.eval, run_dir, model, config.hardware)


def describe(evaluation: EvalConfig) -> str:
    if evaluation.backend == "nemo":
        return f"NeMo-Skills {evaluation.benchmark_spec} ({evaluation.server} server)"
    return f"{','.join(evaluation.tasks)}, few-shot {evaluation.fewshot_values}"
