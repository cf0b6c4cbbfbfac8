"""`python -m lmalign` / `lmalign`: Hydra composes, lmalign validates, then the stage runs.

Hydra prints its own composition errors and exits 1. We let its exceptions through instead
(HYDRA_FULL_ERROR=1) and, when composition fails, diagnose every override so the user sees all
problems at once, one `error:` line each, exit 2 (docs/design.md, Errors and exit codes).
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmalign import callbacks, config_tree
from lmalign.config_tree import CONF_DIR, CONFIG_NAME, register_resolvers
from lmalign.errors import EXIT_USER_ERROR, JobFailed, TrainingStopped, UserError, report

# PEFT calls transformers' renamed property; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient")

_task_started = False
# Jobs that stopped on a user error; reported once Hydra returns (Hydra would add its own line).
_user_errors: list[UserError] = []
_stopped: list[TrainingStopped] = []  # jobs that saved a checkpoint and stopped on a signal


@hydra.main(config_path=CONF_DIR, config_name=CONFIG_NAME, version_base="1.3")
def _hydra_job(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    from hydra.core.hydra_config import HydraConfig

    from lmalign import cache

    try:
        # The hub libraries read their offline switches and cache paths once, when imported.
        cache.use_environment(bool(cfg.offline), cfg.cache.dir, str(cfg.stage))
        from lmalign.run import run_job

        job = HydraConfig.get().job
        if job.get("num") in config_tree.shared_run_dirs:
            raise UserError(config_tree.shared_run_dir_problem(job.num, job.override_dirname,
                                                               cfg.run_name))
        run_job(cfg)
    except UserError as exc:
        _user_errors.append(exc)
        callbacks.job_error.extend(exc.problems)
    except TrainingStopped as exc:
        _stopped.append(exc)
        callbacks.job_error.append(f"stopped: {exc}")
        _hand_on_signal(exc.signal_number)


def _hand_on_signal(number: int | None) -> None:
    """The checkpoint is saved: the signal goes on to whoever handled it before training took
    it over. In a SLURM job that is submitit, which requeues the job (preemption, time limit);
    the requeued job resumes from the checkpoint in the same run directory."""
    import signal

    handler = signal.getsignal(number) if number else None
    if callable(handler):
        print(f"stopped: handing signal {number} on to the launcher's handler", flush=True)
        handler(number, None)


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # exceptions reach us; Hydra would print and exit 1
    register_resolvers()
    failed_jobs = 0
    try:
        _hydra_job()
    except UserError as exc:
        _user_errors.append(exc)
    except JobFailed as exc:  # a cluster job or a cache stage: no traceback
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        failed_jobs = 1
    except (hydra.errors.HydraException, OmegaConfBaseException) as exc:
        if _task_started:
            raise
        report(diagnose(_overrides_from_argv()) or [_message(exc)])
        sys.exit(EXIT_USER_ERROR)
    finally:
        failed_jobs = max(failed_jobs, _collate_sweep())
    for exc in _stopped:
        print(f"stopped: {exc}", file=sys.stderr)
    if _user_errors:
        for exc in _user_errors:
            report(exc.problems)
        sys.exit(EXIT_USER_ERROR)
    if _stopped or failed_jobs:
        sys.exit(1)


def _collate_sweep() -> int:
    """A multirun ends with stage=report on its sweep directory, also when a job failed.
    Returns how many jobs did not finish (a cluster job's error stays in its own process)."""
    from lmalign import report as summary

    sweep = callbacks.current_sweep
    if sweep is None or not any((sweep / summary.JOBS_DIR).glob("[0-9]*.json")):
        return 0  # no job started (composition failed): nothing to collate

    jobs, rows = summary.collate(callbacks.current_sweep)
    done = sum(job.status == "done" for job in jobs)
    print(f"\nsweep: {done} of {len(jobs)} job(s) done, {len(rows)} result row(s): "
          f"{callbacks.current_sweep / summary.SUMMARY_MD}", flush=True)
    for line in summary.trouble_lines(jobs):
        print(line, flush=True)
    return len(jobs) - done


def _message(exc: BaseException) -> str:
    parts = [str(exc)] + ([str(exc.__cause__)] if exc.__cause__ else [])
    return " ".join(p for p in parts if p) or type(exc).__name__


def _overrides_from_argv() -> list[str]:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    return list(args.overrides or [])


# ---------------------------------------------------------------------------------------------
# Diagnosis: compose again and again, each time dropping the override that broke composition,
# until the rest composes; then validate what remains. Each dropped override is one problem.


def diagnose(overrides: list[str]) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException

    from lmalign.validate import validate

    parser = OverridesParser.create()
    problems: list[str] = []
    texts: list[str] = []
    for text in overrides:
        try:
            parsed = parser.parse_overrides([text])[0]
        except Exception as exc:  # the parser's own message says what is wrong
            problems.append(f"could not parse override {text!r}: {exc}")
            continue
        if parsed.is_sweep_override():  # check every value of a sweep, one at a time
            key = parsed.get_key_element()
            texts += [f"{key}={value}" for value in parsed.sweep_string_iterator()]
        else:
            texts.append(text)
    candidates = [(text, parser.parse_overrides([text])[0]) for text in texts]

    GlobalHydra.instance().clear()
    unknown_keys: list[str] = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="lmalign"):
        loader = GlobalHydra.instance().config_loader()
        kept = list(candidates)
        # Sweep values of one key cannot be composed together: test later values separately.
        seen: dict[str, int] = {}
        for index, (_, parsed) in enumerate(kept):
            seen.setdefault(parsed.key_or_group, index)
        extra = [c for i, c in enumerate(kept) if seen[c[1].key_or_group] != i]
        kept = [c for i, c in enumerate(kept) if seen[c[1].key_or_group] == i]

        def culprit(exc: Exception, among: list) -> int | None:
            """Index in `among` (the overrides just composed) of the one that broke it."""
            if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
                group = exc.missing_cfg_file.rsplit("/", 1)[0]
                for i, (_, parsed) in enumerate(among):
                    if parsed.key_or_group.lstrip("/") == group:
                        options = exc.options or loader.get_group_options(group)
                        visible = ", ".join(o for o in options if not o.startswith("_"))
                        value = parsed.value()
                        problems.append(
                            f"{parsed.key_or_group}={value}: no such option in group "
                            f"'{group}'; allowed: {visible}; fix: {parsed.key_or_group}="
                            f"{_closest(str(value), options) or '<one of them>'}")
                        return i
            full_key = getattr(exc.__cause__, "full_key", None) or getattr(exc, "full_key", None)
            for i, (text, parsed) in enumerate(among):
                key = parsed.key_or_group
                if (full_key and key == full_key) or f"'{key}'" in str(exc):
                    unknown_keys.append(key)
                    problems.append(f"{text}: no such key")
                    return i
            return None

        cfg = None
        while True:
            try:
                cfg = compose(CONFIG_NAME, overrides=[t for t, _ in kept])
                break
            except Exception as exc:
                index = culprit(exc, kept)
                if index is None:
                    problems.append(_message(exc))
                    return problems
                kept.pop(index)
        for text, parsed in extra:
            trial = [c for c in kept if c[1].key_or_group != parsed.key_or_group] + [(text, parsed)]
            try:
                compose(CONFIG_NAME, overrides=[t for t, _ in trial])
            except Exception as exc:
                if culprit(exc, trial) is None:
                    problems.append(_message(exc))

        _suggest_keys(problems, unknown_keys, cfg)
        try:
            validate(OmegaConf.to_container(cfg, resolve=True))
        except UserError as exc:
            problems += exc.problems
    return problems


def _closest(word: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(word, [o for o in options if not o.startswith("_")], n=1)
    return match[0] if match else None


def _suggest_keys(problems: list[str], keys: list[str], cfg: DictConfig | None) -> None:
    if cfg is None:
        return
    for key in keys:
        for i, line in enumerate(problems):
            if line.startswith(f"{key}=") or line.startswith(f"+{key}="):
                problems[i] = f"{line}; {_eval_key_hint(line, key, cfg) or _key_hint(key, cfg)}"


def _key_hint(key: str, cfg: DictConfig) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return "allowed: the keys of the config; fix: check the key's spelling"
    known = [str(k) for k in node.keys() if not str(k).startswith("_")]
    match = difflib.get_close_matches(leaf, known, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{match[0]}?" if match \
        else f"use one of {', '.join(known)}"
    return f"allowed: the keys of {parent or 'the config'}; fix: {hint}"


def _eval_key_hint(line: str, key: str, cfg: DictConfig) -> str | None:
    """Evaluation settings live under their backend (eval.harness.tasks, eval.nemo.benchmarks):
    an old flat key, or a key of a backend the command did not select."""
    import dataclasses

    from lmalign.schema import BACKENDS, HarnessConfig, NemoConfig

    parts = key.split(".")
    if parts[0] != "eval" or len(parts) < 2:
        return None
    value = line.split("=", 1)[1].split(": no such key")[0]
    selected = [b for b in BACKENDS if b in cfg.eval]
    if parts[1] in BACKENDS:  # a backend that is not selected
        backend = parts[1]
        wanted = "[" + ",".join(selected + [backend]) + "]"
        return (f"allowed: eval.{backend}.* once eval selects {backend} (selected: "
                f"{', '.join(selected) or 'none'}); fix: 'eval={wanted}', or eval={backend}")
    for backend, schema in (("harness", HarnessConfig), ("nemo", NemoConfig)):
        if parts[1] in {f.name for f in dataclasses.fields(schema)}:
            moved = ".".join(["eval", backend, *parts[1:]])
            select = "" if backend in selected else f"eval={backend} "
            return (f"allowed: evaluation settings under their backend (eval.{backend}.*); "
                    f"fix: {select}{moved}={value}")
    return None
