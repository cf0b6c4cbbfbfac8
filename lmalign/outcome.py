"""How each job of one command ended, told to the command that launched it.

`main()` makes one folder per command and names it in the environment (LMALIGN_OUTCOMES);
every Hydra job of the command, in this process or as a cluster job (sbatch passes the
environment on), writes one JSON file there: what it asked for and how it ended. `main()` reads
them once Hydra returns. Nothing about a job travels through module state (docs/design.md,
Launch and signals).

The folder sits in the working directory, as Hydra's own outputs/ and multirun/ do, so that a
cluster job on another node reaches it; it is removed when the command ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

ENV = "LMALIGN_OUTCOMES"
SWEEP = "sweep.json"  # the sweep to collate once the jobs have ended
REFUSED = "refused.json"  # a sweep refused before it started: job number -> problems
Status = Literal["running", "done", "user error", "stopped"]


@dataclasses.dataclass
class Outcome:
    job: str  # "run", or the sweep job's number
    status: Status = "running"
    problems: list[str] = dataclasses.field(default_factory=list)  # a user error's lines
    stopped: str | None = None  # how to resume, when a signal stopped it
    signal: int | None = None  # the signal that stopped it
    cells: list[str] = dataclasses.field(default_factory=list)  # asked for, in its run dir


@contextmanager
def folder() -> Iterator[Path]:
    """The command's outcomes folder, named in the environment for its jobs."""
    try:
        path = Path(tempfile.mkdtemp(prefix=".lmalign-outcomes-", dir=Path.cwd()))
    except OSError:  # a working directory we may not write: a one-node command still works
        path = Path(tempfile.mkdtemp(prefix="lmalign-outcomes-"))
    before = os.environ.get(ENV)
    os.environ[ENV] = str(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def _folder() -> Path | None:
    named = os.environ.get(ENV)
    return Path(named) if named and Path(named).is_dir() else None


def write(outcome: Outcome) -> None:
    """This job's file, replaced whole (a requeued cluster job writes it again)."""
    from lmalign.rundir import atomic_write_json

    found = _folder()
    # A multi-node job runs on every node; the main node's file says how it went (the others
    # run the same config and stop with it).
    if found is not None and os.environ.get("SLURM_PROCID", "0") == "0":
        atomic_write_json(found / f"job-{outcome.job}.json", dataclasses.asdict(outcome))


def read(job: str) -> Outcome | None:
    found = _folder()
    path = found / f"job-{job}.json" if found else None
    return Outcome(**json.loads(path.read_text())) if path and path.exists() else None


def read_all(path: Path) -> list[Outcome]:
    """Every job's outcome, in job order."""
    found = [Outcome(**json.loads(p.read_text())) for p in path.glob("job-*.json")]
    return sorted(found, key=lambda o: (not o.job.isdigit(), int(o.job) if o.job.isdigit()
                                        else 0))


def collate_later(sweep: Path | None) -> None:
    """The sweep `main()` collates once the jobs end; None: nothing to collate (yet)."""
    from lmalign.rundir import atomic_write_json

    found = _folder()
    if found is None:
        return
    if sweep is None:
        (found / SWEEP).unlink(missing_ok=True)
    else:
        atomic_write_json(found / SWEEP, {"dir": str(sweep)})


def refuse(problems: dict[int, list[str]], jobs: list[int], new_sweep_dir: Path | None) -> None:
    """A sweep found wrong before it started: every job refuses itself, those with problems
    with their lines, the others with none (they are not run either). `new_sweep_dir`: made
    for this sweep alone, so `main()` removes it afterwards."""
    from lmalign.rundir import atomic_write_json

    found = _folder()
    if found is not None:
        atomic_write_json(found / REFUSED, {
            "jobs": {str(number): problems.get(number, []) for number in jobs},
            "remove": str(new_sweep_dir) if new_sweep_dir else None})


def refusal(job: str) -> list[str] | None:
    """This job's problem lines if its sweep was refused ([] when other jobs had them)."""
    found = _folder()
    path = found / REFUSED if found else None
    return json.loads(path.read_text())["jobs"].get(job) if path and path.exists() else None


def refused_sweep_dir(path: Path) -> Path | None:
    """The directory Hydra made for a sweep that was then refused: nothing of it is kept."""
    marker = path / REFUSED
    removed = json.loads(marker.read_text())["remove"] if marker.exists() else None
    return Path(removed) if removed else None


def sweep_to_collate(path: Path) -> Path | None:
    marker = path / SWEEP
    return Path(json.loads(marker.read_text())["dir"]) if marker.exists() else None
