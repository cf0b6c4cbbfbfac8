"""offline=true: the hub libraries' switches and cache paths, set before any of them is imported
(they read them once, at import), and what a run needs checked against the manifest before
anything loads (docs/design.md, Offline cache)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmalign.cache.manifest import DATASETS, HUB, damage, load_manifest
from lmalign.cache.plan import model_items, nemo_items, training_dataset_item
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
    cache_dir = Path(str(config.cache.dir)).expanduser().resolve()
    command = prepare_command(cache_dir, overrides)
    manifest = load_manifest(cache_dir)
    if manifest is None:
        return [problem("cache.dir", str(cache_dir), "offline=true but it holds no manifest.json",
                        "a cache that stage=cache_prepare filled", f"on a connected machine: "
                        f"{command}, then copy {cache_dir} here")]
    training = config.trains
    evaluating = config.evaluates or (config.stage == "watch" and bool(config.eval.backends))
    needed = [(("model.init_from", config.model.init_from) if config.model.init_from else
               ("model.name_or_path", config.model.name_or_path), item)
              for item in model_items(config, [], training or config.stage != "eval", evaluating)]
    if training and (dataset := training_dataset_item(config, [])):
        needed.append((("dataset.path", config.dataset.path), dataset))
    if evaluating and config.eval.nemo is not None:
        needed += [(("eval.nemo.benchmarks", item.repo), item) for item in nemo_items(config)]
    problems = []
    for (key, value), item in needed:
        kept = manifest.items.get(item.key)
        why = "not in its manifest" if kept is None else "; ".join(damage(kept, cache_dir))
        if why:
            problems.append(problem(key, value, f"{item.label} is not in the offline cache "
                                    f"{cache_dir} ({why})", "what stage=cache_prepare fetched",
                                    f"on a connected machine: {command}, then copy the cache "
                                    "here"))
    for task in (config.eval.harness.tasks if evaluating and config.eval.harness is not None
                 else []):
        if task not in manifest.tasks:
            problems.append(problem("eval.harness.tasks", task, "not planned into the offline "
                                    f"cache {cache_dir}",
                                    "tasks whose datasets stage=cache_prepare fetched",
                                    f"on a connected machine: {command}, then copy the cache "
                                    "here"))
            continue
        for key in manifest.tasks[task]:
            kept = manifest.items.get(key)
            why = "; ".join(damage(kept, cache_dir)) if kept else "not in its manifest"
            if why:
                problems.append(problem("eval.harness.tasks", task,
                                        f"{kept.label if kept else key} is not usable in the "
                                        f"offline cache {cache_dir} ({why})",
                                        "what stage=cache_prepare fetched", f"on a connected "
                                        f"machine: {command}, then copy the cache here"))
    return problems


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
