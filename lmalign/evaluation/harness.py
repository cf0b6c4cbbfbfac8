"""lm-evaluation-harness: each checkpoint loads once and runs every few-shot setting."""

from __future__ import annotations

import contextlib
import difflib
import gc
import logging
import math
import re
import shutil
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmalign import adapters, models
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


class _HideLoadedModelWarnings(logging.Filter):
    """HFLM warns about a loaded model given as `pretrained`: lmalign does so on purpose (one
    load per checkpoint) and distributes it itself (harness_model)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("model kwarg is not of type `str`" in message
                    or "Passed an already-initialized model" in message)


logging.getLogger("lm_eval.models.huggingface").addFilter(_HideLoadedModelWarnings())


@lru_cache(maxsize=2)
def _registry(with_lm_eval_tasks: bool):
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_HideCustomDatasetNotice())
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_lm_eval_tasks)


def unreachable_problems(tasks: list[str]) -> list[str]:
    """Tasks whose data comes from the hub when the hub cannot be reached: datasets would retry
    for most of a minute per task, then fail with a traceback."""
    import os

    from lmalign.machine import hub_offline, hub_reachable

    hub = [task for task in tasks if task not in own_tasks()]
    offline = hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "")
    if not hub or offline or hub_reachable():
        return []
    return [problem("eval.harness.tasks", hub, "their datasets come from the hub, which cannot "
                    "be reached from this machine", "tasks whose data is here: lmalign's own "
                    "(tiny_mc, tiny_gen, tiny_prefs, gsm8k_local), your Hugging Face cache, or an offline cache",
                    "HF_DATASETS_OFFLINE=1 if they are in your Hugging Face cache, or "
                    "stage=cache_prepare on a connected machine and offline=true "
                    "cache.dir=<the cache> here")]


def own_tasks() -> set[str]:
    """lmalign's own tasks (lmalign/tasks), which need nothing from the hub."""
    return set(_registry(False).all_tasks)


def task_manager(tasks: Iterable[str] = ()):
    """One registry per process. lm-eval's own scans ~15k task configs (about 9 s on 2 cores);
    tasks that all ship with lmalign (lmalign/tasks) are found without that scan."""
    own = _registry(False)
    wanted = list(tasks)
    if wanted and all(task in own.all_tasks for task in wanted):
        return own
    return _registry(True)


def check_tasks(tasks: list[str]) -> None:
    known = set(task_manager(tasks).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError([problem(
            "eval.harness.tasks", name, "not an lm-eval task or group", "lm-eval task/group names "
            "(`lm-eval ls tasks`) and lmalign's tiny_mc, tiny_gen, tiny_prefs, gsm8k_local",
            "eval.harness.tasks=["
            + ",".join(difflib.get_close_matches(name, known, n=1) or ["tiny_mc"]) + "]")
            for name in unknown])


def settings(evaluation: EvalConfig, num_fewshot: int, processes: int = 1) -> dict[str, Any]:
    """Everything that changes results; part of a cell's identity. Split over several processes,
    lm-eval draws each document's few-shot examples from a per-process random stream, so the
    process count changes few-shot results (measured: tiny_mc 2-shot 0.133 over 2 processes,
    0.167 in one) and is part of those cells."""
    harness = evaluation.harness
    found = {"backend": "harness", "tasks": sorted(harness.tasks), "num_fewshot": num_fewshot,
             "limit": harness.limit, "apply_chat_template": harness.apply_chat_template,
             "fewshot_as_multiturn": harness.multiturn,
             "gen_kwargs": dict(harness.gen_kwargs), "seed": evaluation.seed}
    if processes > 1 and num_fewshot > 0:
        found["processes"] = processes
    return found


def requested_cells(targets: list[Target], evaluation: EvalConfig, run_dir: Path,
                    processes: int = 1) -> list[Path]:
    return [cells.cell_dir(run_dir, target, settings(evaluation, n, processes))
            for target in targets for n in evaluation.harness.fewshot_values]


def evaluate(targets: list[Target], evaluation: EvalConfig, run_dir: Path, model: ModelConfig,
             hardware: HardwareConfig, accelerator=None) -> None:
    """Evaluate every missing cell of these targets x few-shot values. With an accelerator of
    several processes, every process runs this together and the main one writes the cells."""
    # Decided once, before any cell is written, so that every process works through the same list.
    processes = accelerator.num_processes if accelerator else 1
    plan = [(target, [n for n in evaluation.harness.fewshot_values if not cells.is_complete(
        cells.cell_dir(run_dir, target, settings(evaluation, n, processes)),
        need_samples=evaluation.harness.log_samples)]) for target in targets]
    for target, pending in plan:
        if not pending:
            log.info("eval %s: all cells done, skipping", target.label)
            continue
        tokenizer = models.load_tokenizer(target.path, model, target.revision)
        loaded = models.load_trained(target.path, model, hardware, target.revision)
        if hardware.accelerator == "cuda" and model.quantization == "none":
            # HFLM evaluates a loaded model where it lies; quantized ones are placed on loading.
            loaded.to(accelerator.device if accelerator else "cuda")
        lm = harness_model(loaded, tokenizer, evaluation.harness.batch_size, accelerator)
        for num_fewshot in pending:
            _evaluate_cell(target, lm, evaluation, num_fewshot, run_dir)
        del lm, loaded
        gc.collect()


def harness_model(loaded, tokenizer, batch_size: int, accelerator=None):
    """lm-eval's HF model around an already-loaded model: full, LoRA or prompt-tuned, unmerged.

    PEFT prepends prompt-tuning's virtual positions to the logits; lm-eval (0.4.13) offsets its
    continuation slice by the extra length, and tests/test_harness.py holds it to that.

    Several processes: HFLM takes a loaded model as a single process, leaving distribution to
    the caller ("custom distributed integration"); given this process's rank, world size and
    accelerator, lm-eval splits every task's requests across the processes and gathers the
    results on the main one. (Its own data-parallel mode loads from a path and counts only
    GPUs, so it would run every request in every process on a CPU.)
    """
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=batch_size)
    if accelerator is not None and accelerator.num_processes > 1:
        adapters.distribute_harness_model(lm, accelerator)
    return lm


def _evaluate_cell(target: Target, lm, evaluation: EvalConfig, num_fewshot: int,
                   run_dir: Path) -> None:
    from lm_eval.loggers import EvaluationTracker

    cell_settings = settings(evaluation, num_fewshot, lm.world_size)
    cell = cells.cell_dir(run_dir, target, cell_settings)
    log.info("eval %s: %s, %d-shot -> %s", target.label, ",".join(evaluation.harness.tasks),
             num_fewshot, cell.relative_to(run_dir))
    if lm.rank != 0:  # a share of the requests; the main process gathers them and writes
        _simple_evaluate(lm, evaluation, num_fewshot, tracker=None)
        return
    with staged_directory(cell) as staging:
        tracker = EvaluationTracker(output_path=str(staging))
        results = _simple_evaluate(lm, evaluation, num_fewshot, tracker)
        samples = results.pop("samples", None) if evaluation.harness.log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
        _flatten(staging)
        cells.write_record(staging, target, cell_settings, metric_rows(results, target),
                           has_samples=bool(samples))


def _simple_evaluate(lm, evaluation: EvalConfig, num_fewshot: int, tracker):
    from lm_eval import simple_evaluate

    with adapters.quiet_git_lookup(), _generation_fits(lm, evaluation):
        return simple_evaluate(
            model=lm, tasks=list(evaluation.harness.tasks), num_fewshot=num_fewshot,
            limit=evaluation.harness.limit, task_manager=task_manager(evaluation.harness.tasks),
            apply_chat_template=evaluation.harness.apply_chat_template,
            fewshot_as_multiturn=evaluation.harness.multiturn,
            gen_kwargs=dict(evaluation.harness.gen_kwargs) or None,
            log_samples=evaluation.harness.log_samples,
            evaluation_tracker=tracker, random_seed=evaluation.seed,
            numpy_random_seed=evaluation.seed, torch_random_seed=evaluation.seed,
            fewshot_random_seed=evaluation.seed)


@contextlib.contextmanager
def _generation_fits(lm, evaluation: EvalConfig):
    """lm-eval asserts that a generating task's max_gen_toks (256 for gsm8k) is below the model's
    context; a small-context model (model=tiny: 256 positions) meets that assertion as a
    traceback. Here it is one line with the override that fits."""
    try:
        yield
    except AssertionError as exc:
        found = re.search(r"max tokens to generate \((\d+)\).*sequence length \((\d+)\)",
                          str(exc))
        if not found:
            raise
        wanted, context = int(found[1]), int(found[2])
        key = "eval.harness.gen_kwargs.max_gen_toks"
        already = "max_gen_toks" in evaluation.harness.gen_kwargs  # then no "+" to add it
        raise UserError(problem(
            key, evaluation.harness.gen_kwargs.get("max_gen_toks", wanted),
            f"the tasks ({', '.join(evaluation.harness.tasks)}) generate up to {wanted} "
            f"tokens, but the model reads at most {context} positions, its prompt included",
            f"fewer than {context} tokens to generate",
            f"{'' if already else '+'}{key}={context // 2}")) from None


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
    """metrics.csv rows (docs/design.md, Evaluation backends) from lm-eval's results (metric
    keys look like 'acc,none')."""
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
