"""stage=cache_plan: everything a run's config names from the hub (model revisions, the training
dataset, the datasets behind every lm-eval task with groups expanded through lm-eval's own
registry, NeMo-Skills benchmark data, synthesis' generator and reward model, a judge lmalign
serves), whatever stage it will run (docs/design.md, Offline cache)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmalign import adapters
from lmalign.cache.manifest import Item, Manifest, Plan, keep
from lmalign.schema import Config
from lmalign.tables import aligned

log = logging.getLogger(__name__)
LOCAL_TASK = "generated locally (lmalign's tiny tasks, custom_dataset): nothing to fetch"


def plan(config: Config, planned: Manifest | None = None) -> Plan:
    """planned: a manifest whose task expansions are reused (lm-eval's registry takes ~9 s to
    build, so a re-run of cache_prepare only builds it for tasks the manifest lacks)."""
    items: dict[str, Item] = {}
    local: list[str] = []

    def add(item: Item) -> str:
        return keep(items, item).key

    for item in model_items(config, local, training=True, evaluating=True):
        add(item)
    for _, item in synthesis_items(config, local) + served_judge_items(config, local):
        add(item)
    dataset = training_dataset_item(config, local)
    if dataset:
        add(dataset)
    tasks: dict[str, list[str]] = {}
    if config.eval.harness is not None:
        known = planned.tasks if planned else {}
        for task in config.eval.harness.tasks:
            if task in known and all(key in planned.items for key in known[task]):
                tasks[task] = [add(planned.items[key]) for key in known[task]]
        new = [task for task in config.eval.harness.tasks if task not in tasks]
        for task, needed in (task_items(new) if new else {}).items():
            tasks[task] = [add(item) for item in needed]
    if config.eval.nemo is not None:
        for item in nemo_items(config):
            add(item)
        local.append("eval=nemo: NeMo-Skills' own environment (eval.nemo.nemo_env); install it on "
                     "the cluster too (README: NeMo-Skills)")
    return Plan(list(items.values()), tasks, local)


def nemo_items(config: Config) -> list[Item]:
    """Each NeMo-Skills benchmark's data, which `ns prepare_data` downloads."""
    from lmalign.evaluation import nemo_skills

    names = dict.fromkeys(b.name for b in nemo_skills.parse_benchmarks(config.eval.nemo.benchmark_spec))
    return [Item("nemo-benchmark", name, needed_by=["eval=nemo"]) for name in names]


def synthesis_items(config: Config, local: list[str]) -> list[tuple[tuple[str, str], Item]]:
    """stage=synthesize's generator and its scorer (a reward model, or a judge lmalign serves),
    where named: ((key, value), item) each."""
    synth = config.synth
    scorer = ("synth.judge.model", synth.judge.model if synth.judge.server else None) \
        if synth.scorer == "judge" else ("synth.reward_model", synth.reward_model)
    return [found for key, name in (("synth.generator", synth.generator), scorer)
            if name for found in _named_model(key, name, config.runs_root, local)]


def served_judge_items(config: Config, local: list[str]) -> list[tuple[tuple[str, str], Item]]:
    """A judge model lmalign serves itself (eval.judge.server, eval.nemo.judge.server); an API
    judge needs nothing from the hub."""
    judges = []
    if config.eval.judge is not None:
        judges.append(("eval.judge.model", config.eval.judge))
    if config.eval.nemo is not None:
        judges.append(("eval.nemo.judge.model", config.eval.nemo.judge))
    return [found for key, judge in judges if judge.server and judge.model
            for found in _named_model(key, judge.model, config.runs_root, local)]


def _named_model(key: str, name: str, runs_root: str, local: list[str]
                 ) -> list[tuple[tuple[str, str], Item]]:
    """A model named by a key that takes a run of ours, a directory or a hub id."""
    from lmalign import models

    start = models.trained_start(name, runs_root)
    if start is not None:
        local.append(f"{key}={name}: {start.adapter or start.path} (copy it over)")
        if start.adapter is None or _is_local(start.path):
            return []
        return [((key, name), Item("model", start.path, start.revision or "main",
                                   needed_by=[f"adapter base of {key}"]))]
    if _is_local(name) or name.count("/") != 1:
        local.append(f"{key}={name} (copy it over)")
        return []
    return [((key, name), Item("model", name, "main", needed_by=[key]))]


def model_items(config: Config, local: list[str], training: bool,
                evaluating: bool) -> list[Item]:
    from lmalign import models

    model = config.model
    estimate = 2 * model.published_params if model.published_params else None  # 16-bit weights
    if model.init_from:
        start = models.trained_start(model.init_from, config.runs_root)
        if start is None:
            local.append(f"model.init_from={model.init_from}: not trained yet; copy its run "
                         "directory over too")
            return []
        local.append(f"model.init_from={model.init_from}: {start.adapter or start.path} (copy "
                     "it over)")
        if start.adapter is None or _is_local(start.path):
            return []
        return [Item("model", start.path, start.revision or "main",
                     needed_by=["adapter base of model.init_from"], estimated_bytes=estimate)]
    if model.source != "pretrained":
        return []
    if _is_local(model.name_or_path):
        local.append(f"model.name_or_path={model.name_or_path} (copy it over)")
        return []
    revisions = [model.revision or "main"] if training or not config.eval.revisions else []
    found = [Item("model", model.name_or_path, revision, needed_by=["model"],
                  estimated_bytes=estimate) for revision in revisions]
    if evaluating:
        found += [Item("model", model.name_or_path, revision, needed_by=["eval.revisions"],
                       estimated_bytes=estimate) for revision in config.eval.revisions]
    return found


def training_dataset_item(config: Config, local: list[str]) -> Item | None:
    dataset = config.dataset
    if dataset.from_run:
        local.append(f"dataset.from_run={dataset.from_run} (copy that run directory over)")
    elif dataset.source == "local":
        local.append(f"dataset.path={dataset.path} (copy it over)")
    if dataset.source != "hub":
        return None
    splits = [dataset.train_split] + ([dataset.eval_split] if dataset.eval_split else [])
    return Item("dataset", str(dataset.path), dataset.revision, dataset.subset, splits=splits,
                needed_by=[f"training (dataset={dataset.name})"])


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()


def task_items(tasks: list[str]) -> dict[str, list[Item]]:
    """Each task or group as named, with the datasets of its leaf tasks (lm-eval's registry)."""
    from lmalign.evaluation import harness

    harness.check_tasks(tasks)
    index = adapters.task_index(harness.task_manager(tasks))
    found: dict[str, list[Item]] = {}
    for task in tasks:
        found[task] = [item for leaf, settings in _leaf_tasks(index, task, {})
                       if (item := _dataset_of(leaf, settings)) is not None]
    return found


def _leaf_tasks(index, name: str, overrides: dict[str, Any]) -> Iterator[tuple[str, dict]]:
    """(task name, its settings) for every task under `name`, the way lm-eval's TaskFactory
    builds them (group-level settings and per-member overrides applied), without building them:
    building a task loads its dataset."""
    entry = index[name]
    kind = adapters.entry_kind(entry)
    if kind == "tag":
        for member in sorted(entry.tags):
            if member in index:
                yield from _leaf_tasks(index, member, overrides)
    elif kind == "group":
        yield from _group_members(index, name, adapters.task_settings(entry), overrides)
    else:
        settings = {**adapters.task_settings(entry), **overrides}
        if kind == "python task":
            settings["_class"] = entry
        yield name, settings


def _group_members(index, group: str, raw: dict[str, Any],
                   overrides: dict[str, Any]) -> Iterator[tuple[str, dict]]:
    from lm_eval.config.group import GroupConfig

    group_fields = {f.name for f in dataclasses.fields(GroupConfig)}
    shared = {k: v for k, v in raw.items() if k not in group_fields} | overrides
    members = raw.get("task")
    for member in members if isinstance(members, list) else []:
        if isinstance(member, str):
            if member in index:
                yield from _leaf_tasks(index, member, shared)
        elif "group" in member:
            inline = {k: v for k, v in member.items() if k != "group"}
            if member["group"] in index:
                yield from _leaf_tasks(index, member["group"], shared | inline)
            else:
                yield from _group_members(index, f"{group}::{member['group']}", member, shared)
        elif "task" in member:
            settings = shared | {k: v for k, v in member.items() if k != "task"}
            if member["task"] in index:
                yield from _leaf_tasks(index, member["task"], settings)
            else:
                yield f"{group}::{member['task']}", settings


def _dataset_of(task: str, settings: dict[str, Any]) -> Item | None:
    if settings.get("custom_dataset"):
        return None
    path, subset = settings.get("dataset_path"), settings.get("dataset_name")
    if not path and "_class" in settings:  # a Python task: its class names the dataset
        try:
            cls = adapters.task_settings(settings["_class"], resolve=True).get("class")
            path, subset = getattr(cls, "DATASET_PATH", None), getattr(cls, "DATASET_NAME", None)
        except Exception as exc:  # the task's module may need optional packages
            log.warning("%s: could not read its dataset from its class (%s)", task, exc)
    if not path:
        return None
    kwargs = dict(settings.get("dataset_kwargs") or {})
    kwargs.pop("trust_remote_code", None)  # lm-eval drops it for datasets >= 4 too
    revision = kwargs.pop("revision", None)
    splits = [settings[k] for k in ("training_split", "validation_split", "test_split",
                                    "fewshot_split") if settings.get(k)]
    return Item("dataset", str(path), revision, subset, kwargs, list(dict.fromkeys(splits)),
                needed_by=[task])


def describe(found: Plan, manifest_path: Path | None) -> str:
    rows = [("kind", "item", "revision", "needed by", "size")]
    for item in found.items:
        users = item.needed_by[:2] + ([f"+{len(item.needed_by) - 2} more"]
                                      if len(item.needed_by) > 2 else [])
        name = item.repo + (f" ({item.subset})" if item.subset else "")
        rows.append((item.kind, name, item.revision or "-", ", ".join(users), item.size))
    lines = [f"cache plan: {len(found.items)} item(s) to fetch", *aligned(rows, indent="  ")]
    if found.tasks:
        lines.append("  eval tasks: " + ", ".join(
            f"{task} -> {len(keys)} dataset(s)" if keys else f"{task} -> {LOCAL_TASK}"
            for task, keys in found.tasks.items()))
    if any(not item.files for item in found.items):
        lines.append("  sizes: a model's is estimated from its parameter count; every item's "
                     "is known once stage=cache_prepare has fetched it")
    lines += [f"  from this machine's disk: {note}" for note in found.local]
    lines.append(f"manifest: {manifest_path}" if manifest_path else
                 "manifest: not written (set cache.dir=<dir> to start a cache with this plan; "
                 "stage=cache_prepare then fetches it)")
    return "\n".join(lines)

