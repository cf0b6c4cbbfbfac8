"""A job: validate, then train and/or evaluate in the run directory, skipping what is done."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from pydantic import TypeAdapter

from lmalign import cache, callbacks, evaluation, launch, loggers, models, rundir, secrets
from lmalign.errors import TrainingStopped, UserError, problem
from lmalign.evaluation import cells, harness
from lmalign.evaluation.cells import Target
from lmalign.schema import Config, ModelConfig
from lmalign.validate import validate

log = logging.getLogger("lmalign")
TRAINING_KEYS = ("model", "dataset", "method", "seed")
TRAINING_STAGES = ("train_eval", "train")
MERGED = "merged"
EVAL_STAGES = ("train_eval", "eval")
# What offline=true checks against the cache's manifest before it starts: stages that load.
OFFLINE_CHECKED_STAGES = ("train_eval", "train", "eval", "merge", "watch")


def run_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    explicit = {o.split("=", 1)[0].lstrip("+~") for o in hydra_cfg.overrides.task}
    config = validate(OmegaConf.to_container(cfg, resolve=True), explicit_keys=explicit)
    secrets.export(config.secrets)
    secrets.scrub_argv(secrets.secret_values(config.secrets))
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if config.offline and not config.dry_run and config.stage in OFFLINE_CHECKED_STAGES:
        problems = cache.offline_problems(config, list(hydra_cfg.overrides.task))
        if problems:
            raise UserError(problems)
    if config.dry_run or config.stage == "report" or config.stage.startswith("cache_"):
        if config.dry_run:
            from lmalign import plan

            launcher = hydra_cfg.launcher
            cluster = not str(launcher._target_).startswith("hydra._internal.")
            print(plan.describe(config, run_dir, OmegaConf.to_container(launcher, resolve=True)
                                if cluster else None), flush=True)
        elif config.stage == "report":
            _report(Path(config.report.dir) if config.report.dir else run_dir, config.report.pack)
        else:
            cache.run_stage(config, list(hydra_cfg.overrides.task))
        if {p.name for p in run_dir.iterdir()} <= {"lmalign.log"}:
            shutil.rmtree(run_dir)  # made by Hydra for this dry run or report alone
            for parent in run_dir.resolve().parents:  # outputs/<date>/ when nothing else is there
                if parent == Path.cwd() or any(parent.iterdir()):
                    break
                parent.rmdir()
        return
    if config.stage in TRAINING_STAGES:
        _refuse_changed_settings(cfg, run_dir / hydra_cfg.output_subdir)
    run(config, run_dir, explicit_keys=explicit)


def _report(directory: Path, pack: bool) -> None:
    from lmalign import report

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
    if pack:
        print(f"packed: {report.pack(directory, jobs)}", flush=True)


def _refuse_changed_settings(cfg: DictConfig, record_dir: Path) -> None:
    """A run directory describes one training run: re-running it must not change what it was."""
    before_text = callbacks.previous_record.get("config.yaml")
    has_training = rundir.final_dir(record_dir.parent) or rundir.complete_checkpoints(
        record_dir.parent)
    if not before_text or not has_training:
        return
    before = OmegaConf.to_container(OmegaConf.create(before_text), resolve=False)
    after = OmegaConf.to_container(cfg, resolve=False)
    changes = [change for key in TRAINING_KEYS
               for change in _differences(key, before.get(key), after.get(key))]
    if changes:
        callbacks.restore_previous_record(record_dir)
        raise UserError([problem(
            key, new, f"this run directory ({record_dir.parent}) was trained with {key}={old!r}",
            "the same training settings when re-running a run_name",
            "use a new run_name, or stage=eval to evaluate this run") for key, old, new in changes])


def _differences(key: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for sub in sorted(set(old) | set(new)):
            found += _differences(f"{key}.{sub}", old.get(sub), new.get(sub))
        return found
    return [] if old == new else [(key, old, new)]


def run(config: Config, run_dir: Path, explicit_keys: set[str] | None = None) -> None:
    import torch

    if config.hardware.torch_threads:
        torch.set_num_threads(config.hardware.torch_threads)
    if not launch.is_main_node(config.hardware):
        # The other nodes start their share of the workers; the main node records and evaluates.
        if config.stage in TRAINING_STAGES and not rundir.final_dir(run_dir):
            launch.train_in_workers(config, _worker_config(config), run_dir)
        log.info("node %d of %d: training done; node 0 records the run and evaluates",
                 launch.rendezvous(config.hardware).machine_rank, config.hardware.num_nodes)
        return
    if config.stage == "watch":  # beside a training run: never writes its run.json
        from lmalign import watch

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        watch.watch(config, run_dir, _trained_from(config, run_dir), overrides)
        return
    record = rundir.RunRecord(run_dir, config.stage)
    log.info("run directory: %s", run_dir.resolve())
    evaluating = config.stage in EVAL_STAGES and config.eval.backend != "none"
    try:
        if evaluating:
            evaluation.check(config.eval)  # before training, not after it
        base_config = _trained_from(config, run_dir)
        start = models.starting_point(dataclasses.replace(config, model=base_config))
        if config.stage == "merge":
            merge_final(run_dir, base_config, config)
        if config.stage in TRAINING_STAGES:
            problems = models.start_problems(start, config)
            if problems:
                raise UserError(problems)
            _train(config, run_dir, start, record)
        if evaluating:
            targets = _targets(config, run_dir, start, explicit_keys or set())
            processes = launch.evaluation_processes(config.hardware)
            callbacks.job_cells[:] = [str(c.relative_to(run_dir)) for c in
                                      evaluation.requested_cells(targets, config.eval, run_dir,
                                                                 processes)]
            if config.eval.backend == "nemo":  # the server takes the GPUs; ns runs on the CPU
                from lmalign.evaluation import nemo

                nemo.evaluate(targets, config.eval, run_dir, base_config, config.hardware,
                              config.cache.dir)
            elif processes > 1:
                launch.evaluate_in_workers(config, _worker_config(config), run_dir, {
                    "targets": [dataclasses.asdict(t) for t in targets],
                    "model": TypeAdapter(ModelConfig).dump_python(base_config, mode="json")})
            else:
                harness.evaluate(targets, config.eval, run_dir, base_config, config.hardware)
            rows = cells.rebuild_metrics_csv(run_dir)
            shown = [r for r in rows if r["checkpoint"] in {t.label for t in targets}]
            if shown:
                print("\n" + cells.comparison_table(shown) + "\n", flush=True)
            from lmalign import report

            report.write_plots(rows, run_dir / report.PLOTS_DIR)
            log.info("metrics: %s (plots in %s)", run_dir / cells.METRICS_CSV,
                     run_dir / report.PLOTS_DIR)
        record.finish("done")
    except KeyboardInterrupt:
        record.finish("interrupted")
        raise
    except TrainingStopped as exc:
        record.finish("stopped", error=str(exc))
        raise
    except UserError:
        record.finish("failed (user error)")
        raise
    except BaseException as exc:
        if config.offline and cache.offline_failure(exc):  # a library found the cache lacking
            record.finish("failed (user error)")
            overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
            command = cache.prepare_command(Path(str(config.cache.dir)).expanduser().resolve(),
                                            overrides)
            raise UserError(problem(
                "offline", True, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                f"what stage=cache_prepare fetched into {config.cache.dir}",
                f"on a connected machine: {command}, then copy the cache here")) from None
        record.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        loggers.finish(config.logger)


def _train(config: Config, run_dir: Path, start: models.Start,
           record: rundir.RunRecord) -> None:
    if rundir.final_dir(run_dir):
        log.info("training already finished (%s exists): skipping", run_dir / rundir.FINAL)
        return
    from lmalign.training import gradient_accumulation  # loads transformers: not before here

    if config.model.init_from:
        log.info("starting from %s", start.label)
    log.info("training: method=%s model=%s dataset=%s hardware=%s (global batch %d = %d per "
             "device x %d processes x %d accumulation)", config.method.name, config.model.name,
             config.dataset.name, config.hardware.name, config.method.global_batch_size,
             config.hardware.per_device_batch_size, config.hardware.world_size,
             gradient_accumulation(config))
    record.update(train={"status": "running"})
    if launch.needs_workers(config.hardware):
        summary = launch.train_in_workers(config, _worker_config(config), run_dir)
    else:
        summary = get_method(config.method._target_)(config, run_dir, start)
    record.update(train={"status": "done", **summary})
    if summary.get("train_tokens_per_s"):
        log.info("trained %s steps at %.0f tokens/s", summary["global_step"],
                 summary["train_tokens_per_s"])


def _worker_config(config: Config) -> dict[str, Any]:
    """The validated config for the workers; secrets stay in the environment, saved as ***."""
    saved = TypeAdapter(Config).dump_python(config, mode="json")
    saved["secrets"] = {name: "***" for name in saved["secrets"]}
    return saved


def merge_final(run_dir: Path, model: ModelConfig, config: Config) -> Path:
    """final/'s adapter merged into its base: a full model in merged/, for serving."""
    merged = run_dir / MERGED
    if (merged / "config.json").exists():
        log.info("already merged: %s", merged)
        return merged
    final = rundir.final_dir(run_dir)
    info = models.adapter_config(final) if final else None
    kind = models.adapter_kind(info) if info else None
    if kind != "lora":
        raise UserError(problem(
            "stage", "merge", f"{run_dir / rundir.FINAL} holds " + (
                "no trained model" if not final else "a full model already" if info is None
                else f"a {kind} adapter, which has no weights to merge into"),
            "stage=merge on a run whose final/ is a LoRA adapter",
            "evaluate or serve final/ as it is, or train with method=lora first"))
    models.merge_adapter(str(final), model, config.hardware, merged)
    log.info("merged %s into its base model: %s", final, merged)
    return merged


def _trained_from(config: Config, run_dir: Path):
    """The model a run started from: its own record if it has one, else this config's model."""
    saved = run_dir / ".hydra" / "config.yaml"
    if config.stage in ("eval", "merge", "watch") and saved.exists():
        model = OmegaConf.to_container(OmegaConf.load(saved).model, resolve=True)
        return TypeAdapter(ModelConfig).validate_python(model)
    return config.model


def _label(revision: str) -> str:
    return revision.replace("/", "_")


def _step_of(revision: str) -> int | None:
    """The training step a revision names (step-125000, stage1-step10000-tokens41B), if any."""
    found = re.search(r"step[-_]?(\d+)", revision) or re.fullmatch(r"\D*(\d+)", revision)
    return int(found.group(1)) if found else None


def _targets(config: Config, run_dir: Path, start: models.Start,
             explicit_keys: set[str]) -> list[Target]:
    checkpoints = rundir.complete_checkpoints(run_dir)
    final = rundir.final_dir(run_dir)
    final_step = (rundir.read_record(run_dir).get("train") or {}).get("global_step")
    targets: list[Target] = []
    problems: list[str] = []
    if config.eval.revisions:  # a hub model's intermediate revisions, one load each
        return [Target(_label(revision), _step_of(revision), start.path, revision)
                for revision in dict.fromkeys(config.eval.revisions)]
    for selector in config.eval.checkpoint_selectors:
        if selector == "base":
            if start.revision not in (None, "main") and not start.adapter:
                # A revision (model.revision=step-1000, or a sweep over several) is its own point
                targets.append(Target(_label(start.revision), _step_of(start.revision),
                                      start.path, start.revision))
                continue
            targets.append(Target("base", 0, start.label, None if start.adapter else
                                  start.revision))
        elif selector == "final":
            if final:
                targets.append(Target("final", final_step, str(final)))
            elif "eval.checkpoints" in explicit_keys:
                problems.append(problem("eval.checkpoints", selector,
                                        f"no trained model in {run_dir / rundir.FINAL}",
                                        "base, or final once the run has trained",
                                        "train first, or eval.checkpoints=[base]"))
            else:
                log.info("no trained model in %s: evaluating the base model only", run_dir)
        elif selector in ("latest", "all"):
            chosen = checkpoints[-1:] if selector == "latest" else checkpoints
            targets += [Target(p.name, step, str(p)) for step, p in chosen]
        else:
            step = int(selector.removeprefix("checkpoint-"))
            match = [p for s, p in checkpoints if s == step]
            if match:
                targets.append(Target(match[0].name, step, str(match[0])))
            else:
                problems.append(problem("eval.checkpoints", selector, "no such complete checkpoint",
                                        ", ".join(p.name for _, p in checkpoints) or "none yet",
                                        "pick one of the complete checkpoints"))
    if problems:
        raise UserError(problems)
    unique = {t.label: t for t in targets}
    return list(unique.values())

