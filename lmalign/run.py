"""A job: validate, check, then run its stage in the run directory, skipping what is done.

Every stage is one function in `STAGES`. Each checks what it needs (the run exists, the
tasks exist, the checkpoints asked for are there) before it is accepted; only then does it write
anything into the run directory: the record (record.yaml) of a new run, its own attempt in
run.json and its own log file (docs/design.md, Run directory).

Over 400 lines on purpose: the stage table, each stage's checks and the one place where a
command is accepted (`_accepted`) stay together, so a stage reads top to bottom in one file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from pydantic import TypeAdapter

from lmalign import config_tree, evaluation, launch, loggers, merge, models
from lmalign import outcome, rundir, secrets
from lmalign.cache import fetch, offline
from lmalign.errors import Stopped, TrainingStopped, UserError, problem
from lmalign.evaluation import cells, targets
from lmalign.evaluation.cells import Target
from lmalign.schema import Config, ModelConfig
from lmalign.validate import validate

log = logging.getLogger("lmalign")
TRAINING_KEYS = ("model", "dataset", "method", "seed")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's console format


@dataclasses.dataclass(frozen=True)
class Job:
    """One validated command: its config, its run directory and what the user typed."""

    config: Config
    run_dir: Path
    overrides: list[str]  # as typed (secrets included: for commands it prints or hands on)
    explicit: set[str]  # the keys the command line set
    choices: dict[str, str]  # the option chosen in each recorded config group
    launcher: dict[str, Any] | None  # a cluster launcher's resolved settings, else None
    new_dir: bool  # Hydra made the run directory for this command
    ended: outcome.Outcome  # what the job asked for and how it ended, for the command

    @property
    def recorded_overrides(self) -> list[str]:
        return secrets.redact_overrides(self.overrides, self.config.secrets)


def run_job(cfg: DictConfig, ended: outcome.Outcome) -> None:
    """The Hydra job: validate, then the stage; a directory made for a command that wrote
    nothing into it (refused, a dry run, a report) is removed again. `ended` is the job's
    outcome, which the stage adds the cells it asks for to."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    new_dir = not any(run_dir.iterdir())
    try:
        refused = outcome.refusal(ended.job)
        if refused is not None:
            raise UserError(refused)
        job = _validated_job(cfg, hydra_cfg, run_dir, new_dir, ended)
        if job.config.dry_run:
            from lmalign import plan

            print(plan.describe(job.config, run_dir, job.launcher), flush=True)
        elif job.config.loads_weights or job.config.stage == "watch":
            if not launch.is_main_node(job.config.hardware):
                _other_node(job.config, run_dir)
            else:
                STAGES[job.config.stage](job)
        else:
            STAGES[job.config.stage](job)
    finally:
        if new_dir:
            _remove_if_empty(run_dir)


def _validated_job(cfg: DictConfig, hydra_cfg: Any, run_dir: Path, new_dir: bool,
                   ended: outcome.Outcome) -> Job:
    overrides = list(hydra_cfg.overrides.task)
    explicit = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    bases = [(group, option) for group, option in hydra_cfg.runtime.choices.items()
             if group in config_tree.RECORDED_GROUPS and str(option).startswith("_")]
    if bases:  # a shared base composes, but is no option: its missing keys would be noise
        raise UserError([problem(
            group, option, f"a shared base of the {group} options, not an option itself",
            ", ".join(config_tree.group_options(group)), f"{group}=<one of them>")
            for group, option in bases])
    config = validate(OmegaConf.to_container(cfg, resolve=True), explicit_keys=explicit,
                      following=config_tree.interpolated_keys(cfg))
    secrets.export(config.secrets)
    secrets.scrub_argv(secrets.secret_values(config.secrets))
    if config.offline and not config.dry_run and (config.loads_weights
                                                  or config.stage == "watch"):
        problems = offline.offline_problems(config, overrides)
        if problems:
            raise UserError(problems)
    launcher = hydra_cfg.launcher
    choices = {str(group): str(option) for group, option in hydra_cfg.runtime.choices.items()
               if group in config_tree.RECORDED_GROUPS and option is not None}
    return Job(config, run_dir, overrides, explicit, choices,
               OmegaConf.to_container(launcher, resolve=True)
               if config_tree.is_cluster_launcher(launcher._target_) else None, new_dir, ended)


def _remove_if_empty(run_dir: Path) -> None:
    """The run directory made for a command that wrote nothing (refused, a dry run, a report),
    and the folders above it inside the working directory that are left empty (outputs/<date>/,
    runs/)."""
    if not run_dir.is_dir() or any(run_dir.iterdir()):
        return
    run_dir.rmdir()
    here = Path.cwd().resolve()
    for parent in run_dir.resolve().parents:
        if parent == here or not parent.is_relative_to(here) or any(parent.iterdir()):
            break
        parent.rmdir()


def _other_node(config: Config, run_dir: Path) -> None:
    """A multi-node run's other nodes start their share of the workers; node 0 records the run
    and evaluates."""
    if config.trains and not rundir.final_dir(run_dir):
        launch.train_in_workers(config, run_dir)
    log.info("node %d of %d: training done; node 0 records the run and evaluates",
             launch.rendezvous(config.hardware).machine_rank, config.hardware.num_nodes)


# ---------------------------------------------------------------------------------------------
# The stages: each checks, then runs inside `_accepted`.


def train_and_evaluate(job: Job) -> None:
    """stage=train_eval and stage=train."""
    config, run_dir = job.config, job.run_dir
    _refuse_changed_settings(config, run_dir)
    if config.evaluates:
        evaluation.check(config.eval, config.cache.dir)  # before training, not after it
    problems = []
    if config.trains and not rundir.final_dir(run_dir):
        from lmalign.data_preflight import preflight

        problems += preflight(config.dataset)  # before any model is loaded or built
    if problems and not config.model.init_from:
        raise UserError(problems)  # the starting point is fine, and building it takes a while
    try:
        start = models.starting_point(config)
        problems += models.start_problems(start, config)
    except UserError as exc:
        problems += exc.problems
    if problems:
        raise UserError(problems)
    with _accepted(job, owner=True) as record:
        _train(config, run_dir, start, record)
        if config.evaluates:
            _evaluate(job, targets.select(config.eval, run_dir, start, job.explicit),
                      config.model)


def evaluate_run(job: Job) -> None:
    """stage=eval: a run's checkpoints, or a model chosen on the command line."""
    config, run_dir = job.config, job.run_dir
    saved = rundir.saved_config(run_dir)
    problems = [] if saved is not None or _model_chosen(job) else [_no_such_run(
        config, "stage=eval evaluates a run", "choose the model to evaluate: model=<option> "
        "eval.checkpoints=[base]")]
    try:
        if config.evaluates:
            evaluation.check(config.eval, config.cache.dir)
    except UserError as exc:
        problems += exc.problems
    if problems:
        raise UserError(problems)
    model = _trained_from(config, saved)
    start = models.starting_point(dataclasses.replace(config, model=model))
    chosen = targets.select(config.eval, run_dir, start, job.explicit) \
        if config.evaluates else []
    problems = evaluation.target_problems(chosen, config, run_dir) if chosen else []
    if chosen and config.eval.judge is not None:
        from lmalign.evaluation import judge

        problems += judge.baseline_problems(chosen, config.eval, run_dir, config.hardware,
                                            config.runs_root)
    if problems:  # before the command is accepted: a refused one leaves the record as it was
        raise UserError(problems)
    with _accepted(job, owner=saved is None or not saved.trains):
        if chosen:
            _evaluate(job, chosen, model)


def merge_run(job: Job) -> None:
    """stage=merge: final/'s LoRA adapter merged into its base, in merged/."""
    config, run_dir = job.config, job.run_dir
    if not merge.is_merged(run_dir):
        merge.refuse_unmergeable(run_dir)
    with _accepted(job, owner=False):
        merge.merge_final(run_dir, _trained_from(config, rundir.saved_config(run_dir)), config)


def watch_run(job: Job) -> None:
    """stage=watch: beside a training run; never writes its run.json."""
    from lmalign import watch

    saved = rundir.saved_config(job.run_dir)
    if saved is None:
        raise UserError(_no_such_run(job.config, "stage=watch watches a training run that has "
                                     "started", "start the training first"))
    evaluation.check(job.config.eval, job.config.cache.dir)
    handler = _log_to_file(job.run_dir, job.config.stage, owner=False)
    try:
        watch.watch(job.config, job.run_dir, _trained_from(job.config, saved), saved,
                    job.overrides)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def report_run(job: Job) -> None:
    """stage=report: collate a sweep or run directory (reads only)."""
    from lmalign import report

    config = job.config
    directory = Path(config.report.dir) if config.report.dir else job.run_dir
    if not config.report.dir and job.new_dir:
        raise UserError(_no_such_run(config, "stage=report collates a run or sweep",
                                     "report.dir=<sweep directory>"))
    if not directory.is_dir():
        raise UserError(problem("report.dir", str(directory), "no such directory",
                                "a sweep directory (multirun/...) or a run directory",
                                "report.dir=<path>, or run_name=<run>"))
    jobs, rows = report.collate(directory)
    done = sum(job.status == "done" for job in jobs)
    print(f"{len(rows)} result row(s) from {done} of {len(jobs)} job(s): "
          f"{directory / report.SUMMARY_CSV}, {directory / report.SUMMARY_MD}", flush=True)
    for line in report.trouble_lines(jobs):
        print(line, flush=True)
    if config.report.pack:
        print(f"packed: {report.pack(directory, jobs)}", flush=True)


def synthesize_run(job: Job) -> None:
    """stage=synthesize: SFT data and preference pairs from an instruct model and a reward
    model or judge, into the run directory (lmalign/synthesis/pipeline.py)."""
    from lmalign.synthesis import pipeline

    config = job.config
    problems = []
    models_named = [("synth.generator", config.synth.generator)]
    if config.synth.scorer == "reward_model":
        models_named.append(("synth.reward_model", config.synth.reward_model))
    else:  # the judge's key and endpoint, before the generator loads
        from lmalign.evaluation import judge

        problems += judge.check(config.synth.judge, "synth.judge")
    for key, name in models_named:
        start = pipeline.source(name, key, config.runs_root)
        if start.adapter is None and start.path == name and _looks_like_path(name) \
                and not Path(name).expanduser().exists():
            problems.append(problem(key, name, "no run of that name (looked in "
                                    f"{Path(config.runs_root) / name}) and no such directory",
                                    "a run name, a model directory or a hub id",
                                    "train it first, or fix the name"))
        elif key == "synth.reward_model" and models.reward_model_kind(
                start.adapter or start.path, start.revision) is False:
            problems.append(problem(key, name, "is a language model, not a reward model (no "
                                    "sequence-classification head with one output)",
                                    "a method=reward run or a reward model",
                                    f"python -m lmalign method=reward dataset=<pairs> "
                                    f"run_name=rm, then {key}=rm"))
    if problems:
        raise UserError(problems)
    with _accepted(job, owner=True) as record:
        counts = pipeline.synthesize(config, job.run_dir)
        record.update(synth={k: v for k, v in counts.items() if not isinstance(v, dict)})


def _looks_like_path(name: str) -> bool:
    """A hub id is owner/name; anything else with a separator, or starting ./ ~ /, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def cache_stage(job: Job) -> None:
    """stage=cache_plan, cache_prepare, cache_verify (offline clusters)."""
    fetch.run_stage(job.config, job.overrides)


# Adding a stage: its Literal in schema.Stage, its function here, its row in this table.
STAGES: dict[str, Callable[[Job], None]] = {
    "train_eval": train_and_evaluate,
    "train": train_and_evaluate,
    "eval": evaluate_run,
    "merge": merge_run,
    "watch": watch_run,
    "report": report_run,
    "synthesize": synthesize_run,
    "cache_plan": cache_stage,
    "cache_prepare": cache_stage,
    "cache_verify": cache_stage,
}


# ---------------------------------------------------------------------------------------------
# Accepting a command: from here on it writes into the run directory.


@contextmanager
def _accepted(job: Job, owner: bool) -> Iterator[rundir.RunRecord]:
    """The command passed every check: record it, log to its file, and say how it ended.

    owner: the command that makes the run what it is (training, or the first evaluation of a
    run that only evaluates) sets run.json's status; a later stage adds only its attempt."""
    import torch

    config, run_dir = job.config, job.run_dir
    if config.hardware.torch_threads:
        torch.set_num_threads(config.hardware.torch_threads)
    if config.hardware.accelerator == "cpu":
        # accelerate imports DeepSpeed where it is installed, which then warns that it found no
        # GPU: on a CPU profile that is the plan, not news.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not rundir.has_config_record(run_dir) or (config.trains and not _has_trained(run_dir)):
        rundir.write_config_record(run_dir, TypeAdapter(Config).dump_python(config, mode="json"),
                                   job.choices, job.recorded_overrides)
    handler = _log_to_file(run_dir, config.stage, owner)
    record = rundir.RunRecord(run_dir, config.stage, job.recorded_overrides, owner)
    log.info("run directory: %s", run_dir.resolve())

    def finish(status: str, **fields: Any) -> None:  # the cells it asked for, for summaries
        record.finish(status, cells=job.ended.cells, **fields)

    try:
        yield record
        finish("done")
    except KeyboardInterrupt:
        finish("interrupted")
        raise
    except Stopped as exc:
        finish("stopped", error=f"{exc} outside training")
        raise
    except TrainingStopped as exc:
        finish("stopped", error=str(exc))
        raise
    except UserError:
        finish("failed (user error)")
        raise
    except BaseException as exc:
        if config.offline and offline.offline_failure(exc):  # a library found the cache lacking
            finish("failed (user error)")
            command = offline.prepare_command(Path(str(config.cache.dir)).expanduser().resolve(),
                                            job.overrides)
            raise UserError(problem(
                "offline", True, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                f"what stage=cache_prepare fetched into {config.cache.dir}",
                f"on a connected machine: {command}, then copy the cache here")) from None
        finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        loggers.finish(config.logger)
        logging.getLogger().removeHandler(handler)
        handler.close()


def _log_to_file(run_dir: Path, stage: str, owner: bool) -> logging.Handler:
    """The run's log: lmalign.log for the command that owns the run, lmalign-<stage>.log for a
    later stage (Hydra's own file handler is off: it would write before validation)."""
    name = "lmalign.log" if owner else f"lmalign-{stage}.log"
    handler = logging.FileHandler(run_dir / name)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def _has_trained(run_dir: Path) -> bool:
    return bool(rundir.final_dir(run_dir) or rundir.complete_checkpoints(run_dir))


def _refuse_changed_settings(config: Config, run_dir: Path) -> None:
    """A run directory describes one training run: re-running it must not change what it was."""
    saved = rundir.saved_config(run_dir)
    if saved is None or not _has_trained(run_dir):
        return
    before = TypeAdapter(Config).dump_python(saved, mode="json")
    after = TypeAdapter(Config).dump_python(config, mode="json")
    changes = [change for key in TRAINING_KEYS
               for change in _differences(key, before.get(key), after.get(key))]
    if changes:
        raise UserError([problem(
            key, new, f"this run directory ({run_dir}) was trained with {key}={old!r}",
            "the same training settings when re-running a run_name",
            "use a new run_name, or stage=eval to evaluate this run") for key, old, new in changes])


def _differences(key: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for sub in sorted(set(old) | set(new)):
            found += _differences(f"{key}.{sub}", old.get(sub), new.get(sub))
        return found
    return [] if old == new else [(key, old, new)]


def _model_chosen(job: Job) -> bool:
    """stage=eval without a run evaluates a model the command chose on purpose."""
    evaluation_ = job.config.eval
    return (any(k == "model" or k.startswith("model.") for k in job.explicit)
            or job.choices.get("model") != config_tree.default_choice("model")
            or bool(evaluation_.revisions) or evaluation_.checkpoint_selectors == ["base"])


def _no_such_run(config: Config, what: str, otherwise: str) -> str:
    """The run_name names no run: the runs there are, and what else would do."""
    root = Path(config.runs_root)
    runs = sorted(p.name for p in root.iterdir() if (p / rundir.RUN_RECORD).exists()
                  or rundir.has_config_record(p)) if root.is_dir() else []
    named = config.run_name
    return problem("run_name", named, f"{what}; there is no run "
                   + (f"named {named!r} in {root}" if named else "without a run_name"),
                   f"the runs in {root}: {', '.join(runs)}" if runs else f"no run in {root} yet",
                   f"run_name=<one of them>, or {otherwise}" if runs else otherwise)


def _evaluate(job: Job, chosen: list[Target], model: ModelConfig) -> None:
    config, run_dir = job.config, job.run_dir
    job.ended.cells = [str(c.relative_to(run_dir)) for c in
                       evaluation.requested_cells(chosen, config, run_dir)]
    outcome.write(job.ended)
    evaluation.evaluate(chosen, config, run_dir, model)
    rows = cells.rebuild_metrics_csv(run_dir)
    shown = [r for r in rows if r["checkpoint"] in {t.label for t in chosen}]
    if shown:
        print("\n" + cells.comparison_table(shown) + "\n", flush=True)
    from lmalign import report

    report.write_plots(rows, run_dir / report.PLOTS_DIR)
    log.info("metrics: %s (plots in %s)", run_dir / cells.METRICS_CSV, run_dir / report.PLOTS_DIR)


def _train(config: Config, run_dir: Path, start: models.Start,
           record: rundir.RunRecord) -> None:
    if rundir.final_dir(run_dir):
        log.info("training already finished (%s exists): skipping", run_dir / rundir.FINAL)
        return
    if config.model.init_from:
        log.info("starting from %s", start.label)
    log.info("training: method=%s model=%s dataset=%s hardware=%s (global batch %d = %d per "
             "device x %d processes x %d accumulation)", config.method.name, config.model.name,
             config.dataset.name, config.hardware.name, config.method.global_batch_size,
             config.hardware.per_device_batch_size, config.hardware.world_size,
             config.gradient_accumulation)
    record.update(train={"status": "running"})
    if launch.needs_workers(config.hardware):
        summary = launch.train_in_workers(config, run_dir)
    else:
        summary = get_method(config.method._target_)(config, run_dir, start)
    record.update(train={"status": "done", **summary})
    if summary.get("train_tokens_per_s"):
        log.info("trained %s steps at %.0f tokens/s", summary["global_step"],
                 summary["train_tokens_per_s"])


def _trained_from(config: Config, saved: Config | None) -> ModelConfig:
    """The model a run started from: a training run's own record, else this config's model
    (a run that only evaluates may be evaluated again on other revisions of its model)."""
    if config.reads_a_run and saved is not None and saved.trains:
        return saved.model
    return config.model
