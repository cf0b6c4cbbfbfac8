"""offline=true: the hub libraries' switches and cache paths, set before any of them is imported
(they read them once, at import), and what a run needs checked against the manifest before
anything loads (docs/design.md, Offline cache)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lmalign.cache.manifest import DATASETS, HUB, damage, load_manifest
from lmalign.cache.plan import (model_items, nemo_items, served_judge_items, synthesis_items,
                                training_dataset_item)
from lmalign.errors import UserError, problem
from lmalign.schema import Config

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                    "HF_EVALUATE_OFFLINE")
HUB_LIBRARIES = ("huggingface_hub", "datasets", "transformers", "lm_eval", "evaluate")


def environment(offline: bool, cache_dir: str | None, stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    if cache_dir:
        root = Path(cache_dir).expanduser().resolve()
        env |= {"HF_HUB_CACHE": str(root / HUB), "HF_DATASETS_CACHE": str(root / DATASETS)}
    if offline or stage == "cache_verify":
        env |= {switch: "1" for switch in OFFLINE_SWITCHES}
        env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "offline"}
    return env


def use_environment(offline: bool, cache_dir: str | None, stage: str) -> None:
    wanted = environment(offline, cache_dir, stage)
    changed = sorted(k for k, v in wanted.items() if os.environ.get(k) != v)
    loaded = [name for name in HUB_LIBRARIES if name in sys.modules]
    if changed and loaded:
        raise UserError(problem(
            "offline" if offline else "cache.dir", offline if offline else cache_dir,
            f"{', '.join(changed)} must be set before {', '.join(loaded)} load, and an earlier "
            "job of this process loaded them", "the same offline and cache.dir for every job "
            "of a local multirun", "run jobs with other offline/cache settings separately"))
    os.environ.update(wanted)



def offline_problems(config: Config, overrides: list[str]) -> list[str]:
    """What this offline run needs that the cache lacks, grouped: one line per key and kind of
    lack, however many items (mmlu's 57 subjects are one line)."""
    training = config.trains
    evaluating = config.evaluates or (config.stage == "watch" and bool(config.eval.backends))
    if config.stage == "synthesize":  # it loads its generator and reward model, not model=
        needed = synthesis_items(config, [])
    else:
        needed = [(("model.init_from", config.model.init_from) if config.model.init_from else
                   ("model.name_or_path", config.model.name_or_path), item)
                  for item in model_items(config, [], training or config.stage != "eval",
                                          evaluating)]
    if evaluating:
        needed += served_judge_items(config, [])
    if training and (dataset := training_dataset_item(config, [])):
        needed.append((("dataset.path", config.dataset.path), dataset))
    if evaluating and config.eval.nemo is not None:
        needed += [(("eval.nemo.benchmarks", item.repo), item) for item in nemo_items(config)]
    tasks = _hub_tasks(config.eval.harness.tasks) if evaluating and config.eval.harness else []
    if not config.cache.dir:
        if not needed and not tasks:
            return []  # nothing comes from the hub (the embedded model, local data, tiny tasks)
        wanted = [item.label for _, item in needed] + [f"eval task {t}" for t in tasks]
        return [problem("cache.dir", None, "offline=true, and this run needs from the hub: "
                        + _some(wanted), "the offline cache that stage=cache_prepare filled",
                        "offline=true cache.dir=/path/to/lmalign-cache")]
    cache_dir = Path(str(config.cache.dir)).expanduser().resolve()
    command = prepare_command(cache_dir, overrides)
    fix = f"on a connected machine: {command}, then copy the cache here"
    manifest = load_manifest(cache_dir)
    if manifest is None:
        return [problem("cache.dir", str(cache_dir), "offline=true but it holds no manifest.json",
                        "a cache that stage=cache_prepare filled", f"on a connected machine: "
                        f"{command}, then copy {cache_dir} here")]
    lacking: dict[tuple[str, Any, str], list[str]] = {}  # (key, value, why) -> item labels
    for (key, value), item in needed:
        kept = manifest.items.get(item.key)
        why = "not in its manifest" if kept is None else "; ".join(damage(kept, cache_dir))
        if why:
            lacking.setdefault((key, value, why), []).append(item.label)
    for task in tasks:
        if task not in manifest.tasks:
            lacking.setdefault(("eval.harness.tasks", task, "not planned into it"), []).append(
                f"eval task {task}")
            continue
        for key in manifest.tasks[task]:
            kept = manifest.items.get(key)
            why = "; ".join(damage(kept, cache_dir)) if kept else "not in its manifest"
            if why:
                lacking.setdefault(("eval.harness.tasks", task, why.split(" (")[0]), []).append(
                    kept.label if kept else key)
    return [problem(key, value, f"{_some(labels)} {'is' if len(labels) == 1 else 'are'} not "
                    f"in the offline cache {cache_dir} ({why})", "what stage=cache_prepare "
                    "fetched", fix)
            for (key, value, why), labels in lacking.items()]


def _hub_tasks(tasks: list[str]) -> list[str]:
    """The tasks whose data comes from the hub: all but lmalign's own (tiny_mc, ...)."""
    from lmalign.evaluation import harness

    own = harness.own_tasks()
    return [task for task in tasks if task not in own]


def _some(labels: list[str], shown: int = 3) -> str:
    more = len(labels) - shown
    return ", ".join(labels[:shown]) + (f" and {more} more" if more > 0 else "")


def prepare_command(cache_dir: Path, overrides: list[str]) -> str:
    """The command that fetches what this run needs: its own overrides, as a prepare."""
    kept = [o for o in overrides
            if o.split("=", 1)[0].lstrip("+~") not in ("offline", "stage", "cache.dir")]
    return " ".join(["python -m lmalign stage=cache_prepare", f"cache.dir={cache_dir}", *kept])


def offline_failure(exc: BaseException) -> bool:
    """Whether a library failed because something was not in the cache while offline."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or \
                "offline" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False
