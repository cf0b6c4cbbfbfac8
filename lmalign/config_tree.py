"""The Hydra glue: where `conf/` is, the resolvers its YAML uses, and composition outside a job.

Resolvers are pure functions of their arguments (docs/design.md, Architecture). Composition here
serves two readers: `rundir.saved_config` (a recorded run whose record lacks keys that later
versions added takes them from the current defaults of its recorded options) and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CONFIG_NAME = "config"
# Config groups whose chosen option a run's record keeps (not recipes or Hydra's own groups).
RECORDED_GROUPS = ("model", "dataset", "method", "hardware", "eval", "logger")


def _run_dir(root: str, run_name: str | None, timestamped: str) -> str:
    return f"{root}/{run_name}" if run_name else timestamped


# Sweep jobs with a run_name: which job owns each run directory, and jobs that would share one.
# (Written while Hydra resolves each job's subdir; the outcomes-folder rework replaces them.)
_sweep_run_dirs: dict[str, int] = {}
shared_run_dirs: dict[int, tuple[str, int]] = {}


def _sweep_subdir(root: str, run_name: str | None, job_num: int, stage: str = "train_eval") -> str:
    # A sweep job with a run_name lives in <runs_root>/<run_name> like a single run, so chained
    # runs find each other (Hydra joins the sweep dir with an absolute subdir to the subdir).
    # Two training jobs of one sweep must not share it: the later one is kept in the sweep
    # directory and refused before it starts (lmalign.cli). Evaluation jobs may share a run:
    # each writes its own cells.
    if not run_name:
        return str(job_num)
    path = os.path.abspath(os.path.join(root, run_name))
    owner = _sweep_run_dirs.setdefault(path, job_num)
    if owner != job_num and stage not in ("eval", "report"):
        shared_run_dirs[job_num] = (path, owner)
        return str(job_num)
    return path


def shared_run_dir_problem(number: int, overrides: str, run_name: str) -> str:
    from lmalign.errors import problem

    path, owner = shared_run_dirs[number]
    return problem(
        "run_name", run_name, f"sweep job {number} ({overrides}) would share the run directory "
        f"{path} with job {owner}", "one run_name per sweep job",
        "sweep run_name too (run_name=a,b), or vary it: run_name=exp_${hydra:job.num}")


def refuse_shared_run_dirs(jobs: list[tuple[int, Any]]) -> None:
    """Before a cluster sweep is submitted: training jobs that would share a run directory."""
    for _, config in jobs:
        OmegaConf.select(config, "hydra.sweep.subdir")  # registers each job's run directory
    from lmalign.errors import UserError

    problems = [shared_run_dir_problem(number, config.hydra.job.override_dirname,
                                        config.run_name)
                for number, config in jobs if number in shared_run_dirs]
    if problems:
        raise UserError(problems)


def _gpus_per_node(accelerator: str, world_size: int, num_nodes: int) -> int | None:
    """hydra/launcher=slurm: each node's share of the profile's GPUs (none on a CPU profile)."""
    return world_size // num_nodes if accelerator == "cuda" else None


def is_cluster_launcher(target: str) -> bool:
    """hydra/launcher=slurm and the like; Hydra's own launchers run jobs in this process."""
    return not str(target).startswith("hydra._internal.core_plugins.")


def _launch_mode(launcher: str, dry_run: bool) -> str | None:
    """hydra.mode: a cluster launcher runs only multiruns, so it makes every run one (a dry run
    prints its plan here). With Hydra's own launcher, null leaves the choice to -m."""
    return "MULTIRUN" if is_cluster_launcher(launcher) and not dry_run else None


def register_resolvers() -> None:
    for name, fn in (("lmalign_run_dir", _run_dir), ("lmalign_sweep_subdir", _sweep_subdir),
                     ("lmalign_gpus_per_node", _gpus_per_node),
                     ("lmalign_launch_mode", _launch_mode)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def default_choice(group: str) -> str | None:
    """The option conf/config.yaml's defaults list picks for a group."""
    defaults = yaml.safe_load((Path(CONF_DIR) / f"{CONFIG_NAME}.yaml").read_text())["defaults"]
    for entry in defaults:
        if isinstance(entry, dict) and group in entry:
            return str(entry[group])
    return None


def compose_defaults(choices: dict[str, str]) -> dict[str, Any]:
    """The resolved config (no `hydra` node) of these group options and nothing else set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    overrides = [f"{group}={option}" for group, option in choices.items()
                 if group in RECORDED_GROUPS and option]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra job: its loader has conf/
        composed = compose(CONFIG_NAME, overrides=overrides)
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose(CONFIG_NAME, overrides=overrides)
    return OmegaConf.to_container(composed, resolve=True)
