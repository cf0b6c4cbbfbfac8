"""Which models an evaluation scores: a run's base, checkpoints and final model, or a hub
model's revisions (docs/design.md, Evaluation backends)."""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from pathlib import Path

from lmalign import rundir
from lmalign.errors import UserError, problem
from lmalign.evaluation.cells import Target
from lmalign.models import Start
from lmalign.schema import EvalConfig

log = logging.getLogger(__name__)


def label(revision: str) -> str:
    return revision.replace("/", "_")


def step_of(revision: str) -> int | None:
    """The training step a revision names (step-125000, stage1-step10000-tokens41B), if any."""
    found = re.search(r"step[-_]?(\d+)", revision) or re.fullmatch(r"\D*(\d+)", revision)
    return int(found.group(1)) if found else None


def final_target(run_dir: Path) -> Target | None:
    final = rundir.final_dir(run_dir)
    if final is None:
        return None
    return Target("final", (rundir.read_record(run_dir).get("train") or {}).get("global_step"),
                  str(final))


def saved_targets(run_dir: Path) -> list[Target]:
    """Every complete checkpoint, oldest first, then final/ once it exists (the watcher's)."""
    found = [Target(path.name, step, str(path))
             for step, path in rundir.complete_checkpoints(run_dir)]
    final = final_target(run_dir)
    return found + ([final] if final else [])


def select(evaluation: EvalConfig, run_dir: Path, start: Start,
           explicit_keys: Collection[str]) -> list[Target]:
    """The targets eval.checkpoints (or eval.revisions) asks for; a checkpoint that is not there
    is an error when asked for by name, and final/ before training a notice."""
    if evaluation.revisions:  # a hub model's intermediate revisions, one load each
        return [Target(label(revision), step_of(revision), start.path, revision)
                for revision in dict.fromkeys(evaluation.revisions)]
    checkpoints = rundir.complete_checkpoints(run_dir)
    targets: list[Target] = []
    problems: list[str] = []
    for selector in evaluation.checkpoint_selectors:
        if selector == "base":
            if start.revision not in (None, "main") and not start.adapter:
                # A revision (model.revision=step-1000, or a sweep over several) is its own point
                targets.append(Target(label(start.revision), step_of(start.revision),
                                      start.path, start.revision))
                continue
            targets.append(Target("base", 0, start.label, None if start.adapter else
                                  start.revision))
        elif selector == "final":
            final = final_target(run_dir)
            if final:
                targets.append(final)
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
    return list({t.label: t for t in targets}.values())
