"""The run directory: atomic files, the run's record, run.json, and which checkpoints are
complete (docs/design.md, Run directory)."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)
RUN_RECORD = "run.json"
# What the run was asked to be: written by lmalign once a command has passed every check.
CONFIG_RECORD = "record.yaml"
RECORD_VERSION = 2
# record_version 1: Hydra's own output subdir (.hydra/config.yaml, overrides.yaml, hydra.yaml).
OLD_RECORD_DIR = ".hydra"
CHECKPOINTS = "checkpoints"
FINAL = "final"
# The trainer writes its state file last: a checkpoint without it is incomplete.
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"
TRACKED_PACKAGES = ("lmalign", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
                    "lm_eval", "hydra-core", "tokenizers", "huggingface_hub")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with staged_file(path) as staging:
        staging.write_bytes(data)


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A scratch file beside `path` that replaces it only when the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A scratch directory beside `target` that becomes `target` only when the block finishes
    without error (replacing an older copy), so readers never see a half-written one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot load (truncated, unreadable header), or None. Reads only
    the header: the data must reach as far as the header says."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else None
        if length is None or 8 + length > size:
            return f"truncated inside its header ({size} bytes)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "has an unreadable header"
    end = max((entry["data_offsets"][1] for name, entry in header.items()
               if name != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"is truncated ({size} bytes; its header describes {8 + length + end})"
    return None


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first. Complete: the trainer's state
    file (written last) exists and every weights file is whole; a corrupt one is reported by
    name and passed over, so resume and evaluation fall back to the one before it."""
    found = []
    for path in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if not match or not (path / CHECKPOINT_COMPLETE_MARKER).exists():
            continue
        problems = [f"{weights.name} {why}" for weights in sorted(path.glob("*.safetensors"))
                    if (why := safetensors_problem(weights))]
        if problems:
            log.warning("skipping corrupt checkpoint %s: %s", path, "; ".join(problems))
            continue
        found.append((int(match.group(1)), path))
    return sorted(found)


def final_dir(run_dir: Path) -> Path | None:
    path = Path(run_dir) / FINAL
    return path if (path / "config.json").exists() or (path / "adapter_config.json").exists() \
        else None


def versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of these distributions (None: not installed), for the records."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_sha() -> str | None:
    source = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware_seen() -> dict[str, Any]:
    import torch

    seen: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return seen


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


class RunRecord:
    """run.json: what ran, where, with which versions, how it ended. Rewritten atomically.

    The run's owner (training, or the command that created the directory) sets the top-level
    status; a later stage (stage=eval on a trained run) adds only its own attempt, so its
    outcome never rewrites the training's."""

    def __init__(self, run_dir: Path, stage: str, overrides: list[str], owner: bool):
        self.path = Path(run_dir) / RUN_RECORD
        self.owner = owner
        self.data: dict[str, Any] = read_record(run_dir)
        attempt = {"stage": stage, "argv": list(sys.argv), "overrides": list(overrides),
                   "started": _now(), "status": "running"}
        if owner:
            found = versions()
            self.data.update({
                "lmalign_version": found["lmalign"],
                "versions": found,
                "git_sha": git_sha(),
                "hardware_seen": hardware_seen(),
                "status": "running",
            })
        self.data.setdefault("attempts", []).append(attempt)
        self.save()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def finish(self, status: str, cells: list[str] | None = None, **fields: Any) -> None:
        """cells: the evaluation cells the command asked for (its attempt alone records them:
        a summary names the command that wrote each cell)."""
        self.data["attempts"][-1].update(status=status, ended=_now(), **fields)
        if cells:
            self.data["attempts"][-1]["cells"] = list(cells)
        if self.owner:
            self.data.update(status=status, ended=_now(), **fields)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------
# The run's record (docs/design.md, Record versions).


def write_config_record(run_dir: Path, container: dict[str, Any], choices: dict[str, str],
                        overrides: list[str]) -> None:
    """record.yaml: the resolved, validated config with every secret as ***, the options chosen
    for each config group (to fill keys that later versions add) and the overrides."""
    from lmalign import secrets

    values = secrets.secret_values(container.get("secrets"))
    config = {**container, "secrets": {name: secrets.MASK for name in container.get("secrets")
                                       or {}}}
    text = yaml.safe_dump({"record_version": RECORD_VERSION, "stage": container.get("stage"),
                           "choices": choices, "overrides": list(overrides), "config": config},
                          sort_keys=False, allow_unicode=True)
    atomic_write_text(Path(run_dir) / CONFIG_RECORD, secrets.redact(text, values))


def has_config_record(run_dir: Path) -> bool:
    """Whether the run has a record of any version (looked up, not parsed)."""
    run_dir = Path(run_dir)
    old = run_dir / OLD_RECORD_DIR
    return (run_dir / CONFIG_RECORD).exists() or (old / "config.yaml").exists() \
        or any(old.glob("*/config.yaml"))


def saved_config(run_dir: Path):
    """The run's recorded config as a typed `Config`, or None for a directory with no record.

    Old layouts are migrated; keys that later versions added are filled from the current
    defaults of the options the run chose, so a new key never invalidates an old run."""
    from lmalign.errors import UserError, problem
    from lmalign.validate import validate

    raw = _raw_record(Path(run_dir))
    if raw is None:
        return None
    try:
        return validate(raw["config"], check_environment=False)
    except UserError:
        pass
    from lmalign import config_tree
    from lmalign.schema import Config

    filled = _fill_missing(Config, raw["config"], config_tree.compose_defaults(raw["choices"]))
    try:
        return validate(filled, check_environment=False)
    except UserError as exc:
        raise UserError([problem("run_name", Path(run_dir).name, f"its record ({raw['path']}) "
                                 f"no longer validates: {line}", "a run recorded by lmalign",
                                 "use a new run_name") for line in exc.problems]) from None


def cell_writers(run_dir: Path) -> dict[str, list[str]]:
    """Each evaluation cell -> the overrides of the command that wrote it: the first attempt in
    run.json that asked for the cell and finished."""
    writers: dict[str, list[str]] = {}
    for attempt in read_record(run_dir).get("attempts", []):
        if attempt.get("status") == "done":
            for cell in attempt.get("cells", []):
                writers.setdefault(cell, [str(o) for o in attempt.get("overrides", [])])
    return writers


def saved_overrides(run_dir: Path) -> list[str]:
    raw = _raw_record(Path(run_dir))
    return [str(o) for o in raw["overrides"]] if raw else []


def saved_stage(run_dir: Path) -> str | None:
    raw = _raw_record(Path(run_dir))
    return raw["config"].get("stage") if raw else None


def _raw_record(run_dir: Path) -> dict[str, Any] | None:
    """{path, config, choices, overrides} from record.yaml, or migrated from record_version 1."""
    path = run_dir / CONFIG_RECORD
    if path.exists():
        data = yaml.safe_load(path.read_text())
        return {"path": path, "config": data["config"], "choices": data.get("choices") or {},
                "overrides": data.get("overrides") or []}
    old = run_dir / OLD_RECORD_DIR
    # Training wrote .hydra/; a run that only evaluated has .hydra/eval/.
    found = [old] + sorted(p.parent for p in old.glob("*/config.yaml"))
    for folder in found:
        if (folder / "config.yaml").exists():
            return _migrate_v1(folder)
    return None


def _migrate_v1(folder: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from lmalign import config_tree

    config_tree.register_resolvers()
    config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True)
    choices: dict[str, str] = {}
    if (folder / "hydra.yaml").exists():
        found = OmegaConf.select(OmegaConf.load(folder / "hydra.yaml"), "hydra.runtime.choices")
        choices = {str(k): str(v) for k, v in (found or {}).items() if v is not None}
    overrides = OmegaConf.load(folder / "overrides.yaml") \
        if (folder / "overrides.yaml").exists() else []
    return {"path": folder / "config.yaml", "config": _nest_eval_keys(config),
            "choices": choices, "overrides": [str(o) for o in overrides]}


def _nest_eval_keys(config: dict[str, Any]) -> dict[str, Any]:
    """record_version 1 kept one backend's keys flat in `eval` (eval.backend, eval.tasks, ...);
    version 2 keeps what backends share at the root and each backend's block under its name."""
    import dataclasses

    from lmalign.schema import HarnessConfig, NemoConfig

    flat = dict(config.get("eval") or {})
    if "backend" not in flat:
        return config
    backend = flat.pop("backend")
    nested = {key: flat[key] for key in ("checkpoints", "revisions", "seed") if key in flat}
    for name, schema in (("harness", HarnessConfig), ("nemo", NemoConfig)):
        if backend == name:
            nested[name] = {f.name: flat[f.name] for f in dataclasses.fields(schema)
                            if f.name in flat}
    return {**config, "eval": nested}


def _fill_missing(schema: type, recorded: Any, defaults: Any) -> Any:
    """Fields of the schema's dataclasses that the record lacks, taken from the defaults; a
    mapping the user wrote (dataset.columns, secrets) is kept as recorded."""
    import dataclasses
    import typing

    if not isinstance(recorded, dict) or not isinstance(defaults, dict):
        return recorded
    filled = dict(recorded)
    for field, annotation in typing.get_type_hints(schema).items():
        nested = next((a for a in (annotation, *typing.get_args(annotation))
                       if dataclasses.is_dataclass(a)), None)
        if field not in filled and field in defaults:
            filled[field] = defaults[field]
        elif nested is not None and field in filled:
            filled[field] = _fill_missing(nested, filled[field], defaults.get(field))
    return filled
