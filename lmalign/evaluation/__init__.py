"""Evaluation backends and the cells they write (docs/design.md, Evaluation backends).

`harness` (lm-evaluation-harness, in this process or its workers), `nemo` (NeMo-Skills through
an inference server), `generate` (answers to a prompt set), `judge` (an LLM judge over those
answers) and `reward` (a reward model's accuracy on held-out pairs). `train_eval`, `stage=eval`,
the watcher and the evaluation jobs it submits all go through `check`, `requested_cells` and
`evaluate` here, so they find the same cells.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmalign import rundir
from lmalign.errors import UserError
from lmalign.evaluation import cells
from lmalign.evaluation.cells import Target
from lmalign.schema import Config, EvalConfig, ModelConfig


def check(evaluation: EvalConfig, cache_dir: str | None = None) -> None:
    """Before anything trains or loads: each selected backend's tasks exist and it is installed.
    Every backend's problems are reported together. cache_dir: the offline cache, which may
    hold prepared benchmark data."""
    problems: list[str] = []
    for backend in evaluation.backends:
        try:
            if backend == "nemo":
                from lmalign.evaluation import nemo

                nemo.check(evaluation, cache_dir)
            elif backend == "generate":
                from lmalign.evaluation import generate

                problems += generate.check(evaluation)
            elif backend == "judge":
                from lmalign.evaluation import judge

                problems += judge.check(evaluation.judge)
            elif backend == "harness":
                from lmalign.evaluation import harness

                harness.check_tasks(evaluation.harness.tasks)
                problems += harness.unreachable_problems(evaluation.harness.tasks)
        except UserError as exc:
            problems += exc.problems
    if problems:
        raise UserError(problems)


def requested_cells(targets: list[Target], config: Config, run_dir: Path) -> list[Path]:
    """The cells these targets need, every selected backend's. The process count is part of a
    few-shot cell's identity (it changes which examples each request sees), so it comes from the
    hardware profile."""
    found: list[Path] = []
    if config.eval.harness is not None:
        from lmalign import launch
        from lmalign.evaluation import harness

        found += harness.requested_cells(targets, config.eval, run_dir,
                                         launch.evaluation_processes(config.hardware))
    if config.eval.nemo is not None:
        from lmalign.evaluation import nemo

        found += nemo.requested_cells(targets, config.eval, run_dir)
    if config.eval.generate is not None:
        from lmalign.evaluation import generate

        found += generate.requested_cells(targets, config.eval, config.hardware, run_dir)
    if config.eval.judge is not None:
        from lmalign.evaluation import judge

        found += judge.requested_cells(targets, config.eval, config.hardware, run_dir)
    if config.eval.reward is not None:
        from lmalign.evaluation import reward

        found += reward.requested_cells(targets, config.eval, run_dir,
                                        reward.pairs_source(config, run_dir))
    return found


def target_problems(targets: list[Target], config: Config, run_dir: Path) -> list[str]:
    """What the chosen models cannot be evaluated with (a reward model by a backend that
    generates), and eval=reward's pairs; before anything loads."""
    from lmalign.evaluation import reward

    saved = rundir.saved_config(run_dir) if config.reads_a_run else None
    method = (saved if saved is not None and saved.trains else config).method.name
    problems = reward.target_problems(targets, config.eval, method)
    if config.eval.reward is not None:
        problems += reward.source_problems(reward.pairs_source(config, run_dir),
                                           config.eval.reward.pairs)
    return problems


def missing_cells(targets: list[Target], config: Config, run_dir: Path) -> list[Path]:
    """The requested cells not finished yet (a harness cell asked for per-sample logs needs
    them too)."""
    need_samples = config.eval.harness is not None and config.eval.harness.log_samples
    return [cell for cell in requested_cells(targets, config, run_dir)
            if not cells.is_complete(cell, need_samples=need_samples
                                     and cell.name.startswith("harness"))]


def evaluate(targets: list[Target], config: Config, run_dir: Path, model: ModelConfig) -> None:
    """Evaluate every missing cell of these targets with each selected backend in turn. model:
    the model the run started from (a checkpoint's base, for adapters and tokenizers)."""
    from lmalign import launch

    problems = target_problems(targets, config, run_dir)
    if problems:
        raise UserError(problems)
    in_workers = []  # backends that share one launch of this node's processes
    if launch.evaluation_processes(config.hardware) > 1:
        in_workers = [b for b in ("harness", "generate") if getattr(config.eval, b) is not None]
        if "generate" in in_workers:
            from lmalign.evaluation import generate

            if any(generate.engine(config.eval.generate, config.hardware, t) != "hf"
                   for t in targets):
                in_workers.remove("generate")  # a server answers; this process asks it
            else:
                generate.refuse_without_chat_template(targets, model)
    if in_workers:
        from pydantic import TypeAdapter

        launch.evaluate_in_workers(config, run_dir, {
            "targets": [dataclasses.asdict(t) for t in targets], "backends": in_workers,
            "model": TypeAdapter(ModelConfig).dump_python(model, mode="json")})
    if config.eval.harness is not None and "harness" not in in_workers:
        from lmalign.evaluation import harness

        harness.evaluate(targets, config.eval, run_dir, model, config.hardware)
    if config.eval.nemo is not None:  # the server takes the GPUs; ns runs on the CPU
        from lmalign.evaluation import nemo

        nemo.evaluate(targets, config.eval, run_dir, model, config.hardware, config.cache.dir)
    if config.eval.generate is not None and "generate" not in in_workers:
        from lmalign.evaluation import generate  # after any server has stopped

        generate.evaluate(targets, config.eval, run_dir, model, config.hardware)
    if config.eval.judge is not None:  # over the answers just made
        from lmalign.evaluation import judge

        judge.evaluate(targets, config.eval, run_dir, config.hardware, config.cache.build_dir,
                       config.runs_root)
    if config.eval.reward is not None:
        from lmalign.evaluation import reward

        reward.evaluate(targets, config.eval, run_dir, model, config.hardware,
                        reward.pairs_source(config, run_dir))


def describe(evaluation: EvalConfig) -> str:
    parts = []
    if evaluation.harness is not None:
        parts.append(f"{','.join(evaluation.harness.tasks)}, few-shot "
                     f"{evaluation.harness.fewshot_values}")
    if evaluation.nemo is not None:
        parts.append(f"NeMo-Skills {evaluation.nemo.benchmark_spec} "
                     f"({evaluation.nemo.server} server)")
    if evaluation.generate is not None:
        generate = evaluation.generate
        parts.append(f"answers to {generate.prompts} x {generate.num_samples} sample(s), up to "
                     f"{generate.max_new_tokens} new tokens")
    if evaluation.judge is not None:
        parts.append(f"judged by {evaluation.judge.model} ({evaluation.judge.rubric} rubric)")
    if evaluation.reward is not None:
        parts.append("reward-model accuracy on "
                     + (evaluation.reward.pairs or "the dataset's held-out pairs"))
    return " and ".join(parts)
