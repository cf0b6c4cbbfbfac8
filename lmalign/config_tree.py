"""The Hydra glue: where `conf/` is, the resolvers its YAML uses, and composition outside a job.

Resolvers are pure functions of their arguments (docs/design.md, Architecture). Composition here
serves two readers: `rundir.saved_config` (a recorded run whose record lacks keys that later
versions added takes them from the current defaults of its recorded options) and the tests.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

# conf/ and launch/ travel inside the package (lmalign/bundled links to them in a checkout),
# so an installed wheel finds them as a checkout does.
BUNDLED = Path(__file__).parent / "bundled"
CONF_DIR = str(BUNDLED / "conf")
CONFIG_NAME = "config"
# Config groups whose chosen option a run's record keeps (not recipes or Hydra's own groups).
RECORDED_GROUPS = ("model", "dataset", "method", "hardware", "eval", "logger", "synth")


def _run_dir(root: str, run_name: str | None, timestamped: str) -> str:
    return f"{root}/{run_name}" if run_name else timestamped


def _sweep_subdir(root: str, run_name: str | None, job_num: int) -> str:
    # A sweep job with a run_name lives in <runs_root>/<run_name> like a single run, so chained
    # runs find each other (Hydra joins the sweep dir with an absolute subdir to the subdir).
    # Training jobs that would share one are refused before the sweep starts
    # (sweep_problems).
    return os.path.abspath(os.path.join(root, run_name)) if run_name else str(job_num)


def sweep_jobs(sweep_config: Any, job_overrides: list[list[str]]) -> list[tuple[int, Any]]:
    """Each job's own config, composed as Hydra's launcher composes it (its number set)."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    loader = GlobalHydra.instance().config_loader()
    jobs = []
    for number, overrides in enumerate(job_overrides):
        config = loader.load_sweep_config(sweep_config, list(overrides))
        with open_dict(config):
            config.hydra.job.num = number
        jobs.append((number, config))
    return jobs


def shared_run_dirs(jobs: list[tuple[int, Any]]) -> dict[int, str]:
    """Sweep jobs that would train in a run directory an earlier job of the sweep owns: each
    one's problem line. Evaluation jobs may share a run (each writes its own cells)."""
    from hydra.core.hydra_config import HydraConfig

    from lmalign.errors import problem

    owners: dict[str, int] = {}
    problems: dict[int, str] = {}
    current = HydraConfig.instance().cfg
    try:
        for number, config in jobs:
            # ${hydra:job.num} in a run_name. set_config makes the given config's hydra
            # node read-only: a copy, so the launcher can still fill in the job's id.
            HydraConfig.instance().set_config(copy.deepcopy(config))
            if not config.run_name:
                continue
            path = _sweep_subdir(config.runs_root, config.run_name, number)
            owner = owners.setdefault(path, number)
            if owner != number and config.stage not in ("eval", "report"):
                problems[number] = problem(
                    "run_name", config.run_name, f"sweep job {number} "
                    f"({config.hydra.job.override_dirname}) would share the run directory "
                    f"{path} with job {owner}", "one run_name per sweep job",
                    "sweep run_name too (run_name=a,b), or vary it: "
                    "run_name=exp_${hydra:job.num}")
    finally:
        HydraConfig.instance().cfg = current
    return problems


def invalid_jobs(jobs: list[tuple[int, Any]]) -> dict[int, list[str]]:
    """Sweep jobs whose config alone is refused (types, bounds, combinations; what needs this
    machine is checked when each job starts): each one's problem lines."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lmalign.errors import UserError
    from lmalign.validate import validate

    problems: dict[int, list[str]] = {}
    current = HydraConfig.instance().cfg
    try:
        for number, config in jobs:
            HydraConfig.instance().set_config(copy.deepcopy(config))  # ${hydra:...}
            task = config.copy()
            with open_dict(task):
                del task["hydra"]
            try:
                validate(OmegaConf.to_container(task, resolve=True), check_environment=False,
                         following=interpolated_keys(task))
            except UserError as exc:
                problems[number] = exc.problems
    finally:
        HydraConfig.instance().cfg = current
    return problems


def sweep_problems(jobs: list[tuple[int, Any]]) -> dict[int, list[str]]:
    """Every problem of a sweep's jobs found before it starts, per job: a sweep with any is
    refused whole, so that no job runs for hours before another is found wrong."""
    found = invalid_jobs(jobs)
    for number, line in shared_run_dirs(jobs).items():
        found.setdefault(number, []).append(line)
    return found


def refuse_invalid_sweep(jobs: list[tuple[int, Any]]) -> None:
    """A cluster sweep: refused whole before anything is submitted."""
    from lmalign.errors import UserError

    problems = sweep_problems(jobs)
    if problems:
        raise UserError(_once([line for number in sorted(problems) for line in problems[number]]))


def _once(lines: list[str]) -> list[str]:
    """The same problem in several jobs (an override they share) is one line."""
    return list(dict.fromkeys(lines))


def _gpus_per_node(accelerator: str, world_size: int, num_nodes: int) -> int | None:
    """hydra/launcher=slurm: each node's share of the profile's GPUs (none on a CPU profile)."""
    return world_size // num_nodes if accelerator == "cuda" else None


def is_cluster_launcher(target: str) -> bool:
    """hydra/launcher=slurm and the like; Hydra's own launchers run jobs in this process."""
    from lmalign.adapters import is_hydra_own_launcher

    return not is_hydra_own_launcher(target)


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


def interpolated_keys(cfg: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose value is an interpolation of another (`eval.seed: ${seed}`)."""
    from omegaconf import DictConfig

    found = set()
    for key, node in cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else []:
        if str(key) == "hydra":
            continue
        if OmegaConf.is_interpolation(cfg, str(key)):
            found.add(f"{prefix}{key}")
        elif isinstance(node, DictConfig):
            found |= interpolated_keys(node, f"{prefix}{key}.")
    return found


def is_group(name: str) -> bool:
    """Whether a name (model, hydra/launcher, experiment) is a config group under conf/."""
    return (Path(CONF_DIR) / name.lstrip("/")).is_dir()


def group_options(group: str) -> list[str]:
    """The options of a config group a user may choose (shared bases start with _)."""
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")
                  if not p.stem.startswith("_"))


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
