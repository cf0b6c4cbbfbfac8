"""lm-evaluation-harness: each checkpoint loads once and runs every few-shot setting."""

from __future__ import annotations

import difflib
import gc
import logging
import math
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmalign import models
from lmalign.errors import UserError, problem
from lmalign.evaluation import cells
from lmalign.evaluation.cells import Target
from lmalign.rundir import staged_directory
from lmalign.schema import EvalConfig, HardwareConfig, ModelConfig

log = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"


class _HideCustomDatasetNotice(logging.Filter):
    """lm-eval advertises --metadata for every custom_dataset task; ours take no arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@lru_cache(maxsize=1)
def task_manager():
    """One registry per process: building it scans ~15k task configs."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_HideCustomDatasetNotice())
    return TaskManager(include_path=str(TASKS_DIR))


def check_tasks(tasks: list[str]) -> None:
    known = set(task_manager().all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError([problem(
            "eval.tasks", name, "not an lm-eval task or group", "lm-eval task/group names "
            "(`lm-eval ls tasks`) and lmalign's tiny_mc, tiny_gen",
            "eval.tasks=[" + ",".join(difflib.get_close_matches(name, known, n=1) or ["tiny_mc"])
            + "]") for name in unknown])


def settings(evaluation: EvalConfig, num_fewshot: int) -> dict[str, Any]:
    """Everything that changes results; part of a cell's identity."""
    return {"backend": "harness", "tasks": sorted(evaluation.tasks), "num_fewshot": num_fewshot,
            "limit": evaluation.limit, "apply_chat_template": evaluation.apply_chat_template,
            "fewshot_as_multiturn": evaluation.fewshot_as_multiturn,
            "gen_kwargs": dict(evaluation.gen_kwargs), "seed": evaluation.seed}


def requested_cells(targets: list[Target], evaluation: EvalConfig, run_dir: Path) -> list[Path]:
    return [cells.cell_dir(run_dir, target, settings(evaluation, n))
            for target in targets for n in evaluation.fewshot_values]


def evaluate(targets: list[Target], evaluation: EvalConfig, run_dir: Path, model: ModelConfig,
             hardware: HardwareConfig) -> None:
    """Evaluate every missing cell of these targets x few-shot values."""
    for target in targets:
        pending = [n for n in evaluation.fewshot_values
                   if not cells.is_complete(cells.cell_dir(run_dir, target, settings(evaluation, n)),
                                            need_samples=evaluation.log_samples)]
        if not pending:
            log.info("eval %s: all cells done, skipping", target.label)
            continue
        tokenizer = models.load_tokenizer(target.path, model, target.revision)
        loaded = models.load_trained(target.path, model, hardware, target.revision)
        lm = harness_model(loaded, tokenizer, evaluation.batch_size)
        for num_fewshot in pending:
            _evaluate_cell(target, lm, evaluation, num_fewshot, run_dir)
        del lm, loaded
        gc.collect()


def harness_model(loaded, tokenizer, batch_size: int):
    """lm-eval's HF model around an already-loaded model: full, LoRA or prompt-tuned, unmerged.

    PEFT prepends prompt-tuning's virtual positions to the logits; lm-eval (0.4.13) offsets its
    continuation slice by the extra length, and tests/test_harness.py holds it to that.
    """
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=batch_size)


def _evaluate_cell(target: Target, lm, evaluation: EvalConfig, num_fewshot: int,
                   run_dir: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    cell_settings = settings(evaluation, num_fewshot)
    cell = cells.cell_dir(run_dir, target, cell_settings)
    log.info("eval %s: %s, %d-shot -> %s", target.label, ",".join(evaluation.tasks), num_fewshot,
             cell.relative_to(run_dir))
    with staged_directory(cell) as staging:
        tracker = EvaluationTracker(output_path=str(staging))
        results = simple_evaluate(
            model=lm, tasks=list(evaluation.tasks), num_fewshot=num_fewshot,
            limit=evaluation.limit, task_manager=task_manager(),
            apply_chat_template=evaluation.apply_chat_template,
            fewshot_as_multiturn=evaluation.fewshot_as_multiturn,
            gen_kwargs=dict(evaluation.gen_kwargs) or None, log_samples=evaluation.log_samples,
            evaluation_tracker=tracker, random_seed=evaluation.seed,
            numpy_random_seed=evaluation.seed, torch_random_seed=evaluation.seed,
            fewshot_random_seed=evaluation.seed)
        samples = results.pop("samples", None) if evaluation.log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
        _flatten(staging)
        cells.write_record(staging, target, cell_settings, metric_rows(results, target),
                           has_samples=bool(samples))


def _flatten(staging: Path) -> None:
    """lm-eval nests its files under a directory named after the model path; keep them flat."""
    for nested in [p for p in staging.iterdir() if p.is_dir()]:
        for item in nested.iterdir():
            shutil.move(str(item), staging / item.name)
        nested.rmdir()


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def metric_rows(results: dict[str, Any], target: Target) -> list[dict[str, Any]]:
    """DESIGN's metrics.csv rows from lm-eval's results (metric keys look like 'acc,none')."""
    rows = []
    # A grouped task's subtasks name their group, so summaries can break a group score down.
    parents = {child: group for group, children in results.get("group_subtasks", {}).items()
               for child in children}
    for task, values in results["results"].items():
        shots = results.get("n-shot", {}).get(task)
        for key, value in values.items():
            if "," not in key or "_stderr," in key or _number(value) is None:
                continue
            metric, mode = key.split(",", 1)
            rows.append({"checkpoint": target.label, "step": target.step, "backend": "harness",
                         "task": task, "group": parents.get(task), "metric": metric,
                         "num_fewshot": shots,
                         "eval_mode": mode, "value": _number(value),
                         "stderr": _number(values.get(f"{metric}_stderr,{mode}"))})
    return rows
