"""The private APIs of libraries lmalign builds on, each behind one small function.

Nothing else in lmalign imports a library's private module or sets its private fields, so a new
release that moves one breaks here, in one place, with the version each was checked against
next to it (docs/design.md, Architecture). The tests that exercise each: tests/test_cli.py
(Hydra), tests/test_cache.py and tests/test_harness.py (lm-eval).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# ---------------------------------------------------------------------------------------------
# Hydra 1.3.2 to 1.3.8 (pyproject pins <1.4).

HYDRA_OWN_LAUNCHERS = "hydra._internal.core_plugins."  # BasicLauncher and friends live here


def command_line_overrides(argv: list[str]) -> list[str]:
    """The overrides of a command line, as Hydra's own argument parser splits them."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    return list(args.overrides or [])


def config_dir(argv: list[str]) -> str | None:
    """The command line's --config-dir (-cd): a folder of the user's own config options."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_known_args(argv)[0].config_dir


def is_multirun(argv: list[str]) -> bool:
    """Whether the command line asks for a multirun (-m, --multirun)."""
    from hydra._internal.utils import get_args_parser

    return bool(get_args_parser().parse_known_args(argv)[0].multirun)


def parse_override(text: str) -> Any:
    """One override as Hydra parses it (hydra.core.override_parser.types.Override); raises
    Hydra's own error, whose message says what is wrong."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([text])[0]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs a multirun makes from its overrides, expanded by Hydra's own basic sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def is_hydra_own_launcher(target: str) -> bool:
    """Hydra's own launchers run jobs in this process; any other (hydra/launcher=slurm) is a
    cluster launcher."""
    return str(target).startswith(HYDRA_OWN_LAUNCHERS)


# ---------------------------------------------------------------------------------------------
# lm-eval 0.4.13 (pyproject pins <0.5).


def task_index(manager: Any) -> Any:
    """The TaskManager's index: task, group and tag names to their entries (.kind, .yaml_path,
    .cfg, .tags), read without building a task (building one loads its dataset)."""
    return manager.task_index


def entry_kind(entry: Any) -> str:
    """"tag", "group", "python task" or "task" for an index entry."""
    from lm_eval.tasks._index import Kind

    return {Kind.TAG: "tag", Kind.GROUP: "group", Kind.PY_TASK: "python task"}.get(entry.kind,
                                                                                   "task")


def task_settings(entry: Any, resolve: bool = False) -> dict[str, Any]:
    """An index entry's settings: its YAML file read with lm-eval's own loader (its !function
    tags resolved only when asked: that imports the task's module), or its inline config."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if entry.yaml_path:
        return dict(load_yaml(entry.yaml_path, resolve_func=resolve))
    return dict(entry.cfg or {})


@contextmanager
def quiet_git_lookup() -> Iterator[None]:
    """lm-eval records `git describe` of the working directory in its results, and outside a
    repository git prints `fatal: not a git repository` to the terminal twice per cell. While
    the block runs, the same lookup runs with git's complaint discarded (None outside a
    repository, as lm-eval's own fallback gives)."""
    import subprocess
    from unittest import mock

    from lm_eval import evaluator

    def describe() -> str | None:
        found = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True)
        return found.stdout.strip() or None if found.returncode == 0 else None

    with mock.patch.object(evaluator, "get_git_commit_hash", describe):
        yield


def distribute_harness_model(lm: Any, accelerator: Any) -> None:
    """HFLM built around a loaded model runs as one process; lm-eval's "custom distributed
    integration" is to set its rank, world size and accelerator, after which it splits every
    task's requests across the processes and gathers results on the main one."""
    lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
    lm.accelerator = accelerator
