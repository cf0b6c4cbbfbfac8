"""`python -m lmalign` / `lmalign`: Hydra composes, lmalign validates, then the stage runs.

Hydra prints its own composition errors and exits 1. We let its exceptions through instead
(HYDRA_FULL_ERROR=1) and, when composition fails, diagnose every override (lmalign.diagnose)
so the user sees all problems at once, one `error:` line each, exit 2 (docs/design.md, Errors
and exit codes). How each job ended reaches `main()` through the command's outcomes folder
(lmalign.outcome), never through module state: the same for a job in this process and a
cluster job.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lmalign import adapters, outcome, processes
from lmalign.config_tree import CONF_DIR, CONFIG_NAME, register_resolvers
from lmalign.errors import (EXIT_INTERRUPTED, EXIT_USER_ERROR, JobFailed, Stopped,
                            TrainingStopped, UserError, report)

# PEFT calls transformers' renamed property; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient")


@hydra.main(config_path=CONF_DIR, config_name=CONFIG_NAME, version_base="1.3")
def _hydra_job(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lmalign.cache import offline

    hydra_config = HydraConfig.get()
    ended = outcome.Outcome(str(hydra_config.job.num)
                            if hydra_config.mode == RunMode.MULTIRUN else "run")
    outcome.write(ended)  # the job started: a Hydra error from here on is not composition's
    try:
        # The hub libraries read their offline switches and cache paths once, when imported.
        offline.use_environment(bool(cfg.offline), cfg.cache.dir, str(cfg.stage))
        from lmalign.run import run_job

        run_job(cfg, ended)
        ended.status = "done"
    except UserError as exc:
        ended.status, ended.problems = "user error", exc.problems
    except TrainingStopped as exc:
        ended.status, ended.stopped, ended.signal = "stopped", str(exc), exc.signal_number
    finally:
        outcome.write(ended)
    if ended.status == "stopped":
        _hand_on_signal(ended.signal)


def _hand_on_signal(number: int | None) -> None:
    """The checkpoint is saved: the signal goes on to whoever handled it before training took
    it over. In a SLURM job that is submitit, which requeues the job (preemption, time limit);
    the requeued job resumes from the checkpoint in the same run directory."""
    import signal

    handler = signal.getsignal(number) if number else None
    if callable(handler) and not processes.is_ours(handler):
        print(f"stopped: handing signal {number} on to the launcher's handler", flush=True)
        handler(number, None)


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # exceptions reach us; Hydra would print and exit 1
    register_resolvers()
    processes.become_subreaper()
    with outcome.folder() as outcomes:
        with processes.owned():
            code = _launch(outcomes)
    if code:
        sys.exit(code)


def _launch(outcomes: Path) -> int:
    """Run the command's jobs; report how they ended. Returns the exit status."""
    from lmalign.diagnose import removed_required_keys

    problems = removed_required_keys(adapters.command_line_overrides(sys.argv[1:]))
    if problems:  # before Hydra, which would read a removed stage or interpolate a removed group
        report(problems)
        return EXIT_USER_ERROR
    failed_jobs = 0
    try:
        _hydra_job()
    except KeyboardInterrupt:  # Ctrl-C: the run's record says "interrupted"
        print("stopped: interrupted (Ctrl-C); run the same command again to resume from the "
              "newest complete checkpoint and skip the evaluations that are done",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Stopped as exc:  # SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 outside training
        print(f"stopped: {exc} (signal {exc.signal_number}); run the same command again to "
              "continue where it stopped", file=sys.stderr)
        return 128 + exc.signal_number
    except UserError as exc:  # refused before any job started (a sweep's shared run_name)
        problems += exc.problems
    except JobFailed as exc:  # a cluster job or a cache stage: no traceback
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        failed_jobs = 1
    except yaml.YAMLError as exc:  # a config file that is not YAML, read while composing
        if outcome.read_all(outcomes):
            raise
        from lmalign.diagnose import broken_yaml

        report([broken_yaml(exc)])
        return EXIT_USER_ERROR
    except (hydra.errors.HydraException, OmegaConfBaseException) as exc:
        if outcome.read_all(outcomes):  # a job started: not a composition error
            raise
        from lmalign.diagnose import diagnose, message

        report(diagnose(adapters.command_line_overrides(sys.argv[1:]),
                        config_dir=adapters.config_dir(sys.argv[1:]),
                        multirun=adapters.is_multirun(sys.argv[1:])) or [message(exc)])
        return EXIT_USER_ERROR
    finally:
        sweep = outcome.sweep_to_collate(outcomes)
        if sweep is not None:
            failed_jobs = max(failed_jobs, _collate_sweep(sweep))
        _remove_refused_sweep(outcome.refused_sweep_dir(outcomes))
    ended = outcome.read_all(outcomes)
    for job in ended:
        if job.status == "stopped":
            print(f"stopped: {job.stopped}", file=sys.stderr)
        problems += job.problems
    if problems:
        report(list(dict.fromkeys(problems)))  # an override all sweep jobs share: one line
        return EXIT_USER_ERROR
    signals = [job.signal for job in ended if job.status == "stopped"]
    if signals:  # the shell's convention: 128 + the signal that stopped it (143: SIGTERM)
        return 128 + signals[0] if signals[0] else 1
    return 1 if failed_jobs else 0


def _remove_refused_sweep(sweep: Path | None) -> None:
    """A refused sweep writes nothing: its new directory goes, and the date folder above it
    (Hydra's multirun/<date>/<time>) when that is left empty."""
    import shutil

    if sweep is None or not sweep.exists():
        return
    shutil.rmtree(sweep, ignore_errors=True)
    for parent in list(sweep.parents)[:2]:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def _collate_sweep(sweep: Path) -> int:
    """A multirun ends with stage=report on its sweep directory, also when a job failed.
    Returns how many jobs did not finish (a cluster job's error stays in its own log)."""
    from lmalign import report as summary

    if not any((sweep / summary.JOBS_DIR).glob("[0-9]*.json")):
        return 0  # no job started: nothing to collate
    jobs, rows = summary.collate(sweep)
    done = sum(job.status == "done" for job in jobs)
    print(f"\nsweep: {done} of {len(jobs)} job(s) done, {len(rows)} result row(s): "
          f"{sweep / summary.SUMMARY_MD}", flush=True)
    for line in summary.trouble_lines(jobs):
        print(line, flush=True)
    return len(jobs) - done
