"""Offline clusters: what a run needs from the hub, fetched into one cache, checked, used offline.

`stage=cache_plan` lists what the run's config names (model revisions, the training dataset, the
datasets behind every lm-eval task, groups expanded through lm-eval's own registry) into
`<cache.dir>/manifest.json`. `stage=cache_prepare` fetches it on a connected machine with
huggingface_hub and datasets into their own cache layouts (`hub/`, `datasets/`), recording
each item's files, sizes and row counts. `stage=cache_verify` loads every item with the offline
switches on. `offline=true` runs from the cache: the switches are set before any hub library is
imported, and what the manifest lacks is one `error:` line naming the prepare command.
The manifest is the contract between the two machines; items are keyed by what identifies them
(repo, subset, revision, load arguments), so plans of several runs merge into one cache.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from lmalign import rundir
from lmalign.errors import JobFailed, UserError, problem
from lmalign.schema import Config

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HUB, DATASETS = "hub", "datasets"
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                    "HF_EVALUATE_OFFLINE")
HUB_LIBRARIES = ("huggingface_hub", "datasets", "transformers", "lm_eval", "evaluate")
# Whose versions the manifest records: a datasets cache written by another major version may
# not load (verify warns).
RECORDED_VERSIONS = ("datasets", "huggingface_hub", "transformers", "lm_eval", "lmalign")
# Never loaded by transformers from a hub repo: other frameworks' and exporters' files.
NEVER_LOADED = ["*.onnx", "*.onnx_data", "*.gguf", "*.h5", "*.msgpack", "*.tflite", "*.ot",
                "*.mlmodel", "onnx/*", "openvino/*", "coreml/*", "original/*"]
# Pickled weights, skipped when the repo has the same weights as safetensors.
PICKLED_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
LOCAL_TASK = "generated locally (lmalign's tiny tasks, custom_dataset): nothing to fetch"


@dataclass
class Item:
    """One thing a run loads from the hub, and what cache_prepare found when it fetched it."""

    kind: Literal["model", "dataset", "nemo-benchmark"]
    repo: str
    revision: str | None = None
    subset: str | None = None  # a dataset's config name (load_dataset's name=)
    load_kwargs: dict[str, Any] = field(default_factory=dict)  # lm-eval's dataset_kwargs
    splits: list[str] = field(default_factory=list)
    needed_by: list[str] = field(default_factory=list)
    estimated_bytes: int | None = None
    status: Literal["planned", "done", "failed"] = "planned"
    error: str | None = None
    commit: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)  # {path (under cache.dir), size}
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        key = f"{self.kind}:{self.repo}" + (f":{self.subset}" if self.subset else "")
        key += f"@{self.revision}" if self.revision else ""
        if self.load_kwargs:
            text = json.dumps(self.load_kwargs, sort_keys=True, default=str)
            key += "#" + hashlib.sha1(text.encode()).hexdigest()[:8]
        return key

    @property
    def label(self) -> str:
        name = self.repo + (f" ({self.subset})" if self.subset else "")
        return f"{self.kind} {name}" + (f" @ {self.revision}" if self.revision else "")

    @property
    def size(self) -> str:
        if self.files:
            return _bytes(sum(f["size"] for f in self.files))
        return f"~{_bytes(self.estimated_bytes)} (est.)" if self.estimated_bytes else "-"


@dataclass
class Plan:
    items: list[Item]
    tasks: dict[str, list[str]]  # eval task as named -> keys of the items it loads
    local: list[str]  # what the run reads from this machine's own disk: copy it yourself


# ---------------------------------------------------------------------------------------------
# Environment: set before anything imports the hub libraries (they read it once, at import).


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


# ---------------------------------------------------------------------------------------------
# Plan: everything the config names, whatever stage it will run (a run's needs are a subset).


def plan(config: Config, planned: Manifest | None = None) -> Plan:
    """planned: a manifest whose task expansions are reused (lm-eval's registry takes ~9 s to
    build, so a re-run of cache_prepare only builds it for tasks the manifest lacks)."""
    items: dict[str, Item] = {}
    local: list[str] = []

    def add(item: Item) -> str:
        return _keep(items, item).key

    for item in model_items(config, local, training=True, evaluating=True):
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
    from lmalign.evaluation import nemo

    names = dict.fromkeys(b.name for b in nemo.parse_benchmarks(config.eval.nemo.benchmark_spec))
    return [Item("nemo-benchmark", name, needed_by=["eval=nemo"]) for name in names]


def _keep(items: dict[str, Item], item: Item) -> Item:
    """The item under its key: a second request for it adds its splits and users."""
    kept = items.setdefault(item.key, item)
    if kept is not item:
        kept.splits = list(dict.fromkeys(kept.splits + item.splits))
        kept.needed_by = list(dict.fromkeys(kept.needed_by + item.needed_by))
    return kept


def model_items(config: Config, local: list[str], training: bool,
                evaluating: bool) -> list[Item]:
    from lmalign import models

    model = config.model
    estimate = 2 * model.published_params if model.published_params else None  # 16-bit weights
    if model.init_from:
        found = models.init_from_dir(model.init_from, config.runs_root)
        if found is None:
            local.append(f"model.init_from={model.init_from}: not trained yet; copy its run "
                         "directory over too")
            return []
        local.append(f"model.init_from={model.init_from}: {found} (copy it over)")
        info = models.adapter_config(found)
        if info is None or _is_local(info["base_model_name_or_path"]):
            return []
        return [Item("model", info["base_model_name_or_path"], info.get("revision") or "main",
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
    if dataset.source == "local":
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
    index = harness.task_manager(tasks).task_index
    found: dict[str, list[Item]] = {}
    for task in tasks:
        found[task] = [item for leaf, settings in _leaf_tasks(index, task, {})
                       if (item := _dataset_of(leaf, settings)) is not None]
    return found


def _load_task_yaml(entry, resolve: bool = False) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    if entry.yaml_path:
        return dict(load_yaml(entry.yaml_path, resolve_func=resolve))
    return dict(entry.cfg or {})


def _leaf_tasks(index, name: str, overrides: dict[str, Any]) -> Iterator[tuple[str, dict]]:
    """(task name, its settings) for every task under `name`, the way lm-eval's TaskFactory
    builds them (group-level settings and per-member overrides applied), without building them:
    building a task loads its dataset."""
    from lm_eval.tasks._index import Kind

    entry = index[name]
    if entry.kind == Kind.TAG:
        for member in sorted(entry.tags):
            if member in index:
                yield from _leaf_tasks(index, member, overrides)
    elif entry.kind == Kind.GROUP:
        yield from _group_members(index, name, _load_task_yaml(entry), overrides)
    else:
        settings = {**_load_task_yaml(entry), **overrides}
        if entry.kind == Kind.PY_TASK:
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
            cls = _load_task_yaml(settings["_class"], resolve=True).get("class")
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
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"cache plan: {len(found.items)} item(s) to fetch"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4]
              for row in rows]
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


# ---------------------------------------------------------------------------------------------
# The manifest: plans merge into it; prepare records what it fetched.


@dataclass
class Manifest:
    items: dict[str, Item] = field(default_factory=dict)
    tasks: dict[str, list[str]] = field(default_factory=dict)
    local: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    prepare: dict[str, Any] = field(default_factory=dict)

    def merge(self, found: Plan) -> None:
        for item in found.items:
            _keep(self.items, item)
        self.tasks |= found.tasks
        self.local = list(dict.fromkeys(self.local + found.local))

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "versions": self.versions, "prepare": self.prepare,
                "tasks": self.tasks, "local": self.local,
                "items": [dataclasses.asdict(item) for item in self.items.values()]}


def manifest_path(cache_dir: Path) -> Path:
    return cache_dir / MANIFEST


def load_manifest(cache_dir: Path) -> Manifest | None:
    path = manifest_path(cache_dir)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    items = [Item(**raw) for raw in data.get("items", [])]
    return Manifest({item.key: item for item in items}, data.get("tasks", {}),
                    data.get("local", []), data.get("versions", {}), data.get("prepare", {}))


@contextmanager
def updating(cache_dir: Path) -> Iterator[Manifest]:
    """Read, change and atomically rewrite the manifest, one process at a time (sweep jobs of a
    plan may merge into one cache together)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = load_manifest(cache_dir) or Manifest()
        yield manifest
        rundir.atomic_write_json(manifest_path(cache_dir), manifest.to_json())


def library_versions() -> dict[str, str | None]:
    found = {}
    for name in RECORDED_VERSIONS:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


# ---------------------------------------------------------------------------------------------
# Stages.


def run_stage(config: Config, overrides: list[str]) -> None:
    for name in ("httpx", "httpx2"):  # one INFO line per HTTP request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    cache_dir = Path(config.cache.dir).expanduser().resolve() if config.cache.dir else None
    if config.stage == "cache_plan":
        found = plan(config)
        if cache_dir:
            with updating(cache_dir) as manifest:
                manifest.merge(found)
        print(describe(found, manifest_path(cache_dir) if cache_dir else None), flush=True)
    elif config.stage == "cache_prepare":
        prepare(config, cache_dir)
    else:
        verify(cache_dir)


def _damage(item: Item, cache_dir: Path) -> list[str]:
    """What is wrong with an item's recorded files on disk (cheap: no loading)."""
    if item.status != "done":
        return [f"not fetched ({item.error})" if item.error else "not fetched yet"]
    found = []
    for recorded in item.files:
        path = cache_dir / recorded["path"]
        if not path.exists():
            found.append(f"missing file {recorded['path']}")
        elif (size := path.stat().st_size) != recorded["size"]:
            kind = "truncated or corrupt safetensors file" if path.suffix == ".safetensors" \
                else "file of the wrong size"
            found.append(f"{kind} {recorded['path']} ({size} of {recorded['size']} bytes)")
    return found


def prepare(config: Config, cache_dir: Path) -> None:
    with updating(cache_dir) as manifest:
        manifest.merge(plan(config, manifest))
    todo = [item for item in manifest.items.values() if _damage(item, cache_dir)]
    print(f"cache_prepare: {len(manifest.items)} item(s) in {manifest_path(cache_dir)}, "
          f"{len(todo)} to fetch", flush=True)
    for number, item in enumerate(todo, 1):
        print(f"[{number}/{len(todo)}] {item.label}", flush=True)
        _remove_damaged(item, cache_dir)
        fetched = _fetch_with_retries(item, cache_dir, config.cache.retries,
                                      config.eval.nemo.nemo_env if config.eval.nemo else None)
        with updating(cache_dir) as latest:  # each item is kept as soon as it is fetched
            latest.items[fetched.key] = fetched
    with updating(cache_dir) as manifest:
        failed = [item for item in manifest.items.values() if item.status != "done"]
        manifest.versions = library_versions()
        manifest.prepare = {
            "total": len(manifest.items), "done": len(manifest.items) - len(failed),
            "failed": [{"item": item.label, "reason": item.error} for item in failed],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    total = sum(f["size"] for item in manifest.items.values() for f in item.files)
    print(f"cache_prepare: {manifest.prepare['done']} of {len(manifest.items)} item(s) in "
          f"{cache_dir} ({_bytes(total)})", flush=True)
    for item in failed:
        print(f"  failed: {item.label}: {item.error}", flush=True)
    if failed:
        raise JobFailed(f"{len(failed)} item(s) could not be fetched (listed above, and in "
                        f"{manifest_path(cache_dir)}); re-run the same command to fetch only "
                        "those")
    if config.cache.pack:
        parts = pack(cache_dir, config.cache.pack_part_gib)
        print("packed: " + ", ".join(str(p) for p in parts), flush=True)
        print("on the cluster: " + (f"cat {parts[0].name[:-4]}* | tar xz" if len(parts) > 1
                                    else f"tar xzf {parts[0].name}"), flush=True)


def _fetch_with_retries(item: Item, cache_dir: Path, retries: int,
                        nemo_env: str | None) -> Item:
    fetched = dataclasses.replace(item, status="planned", error=None, files=[], rows={})
    for attempt in range(retries + 1):
        try:
            if item.kind == "nemo-benchmark":
                _fetch_nemo_benchmark(fetched, cache_dir, nemo_env)
            else:
                (_fetch_model if item.kind == "model" else _fetch_dataset)(fetched, cache_dir)
            fetched.status = "done"
            return fetched
        except Exception as exc:
            fetched.error = f"{type(exc).__name__}: {_first_line(exc)}"
            if attempt < retries and _worth_retrying(exc):
                wait = 2 ** attempt
                print(f"  attempt {attempt + 1} failed ({fetched.error}); retrying in {wait} s",
                      flush=True)
                time.sleep(wait)
            else:
                break
    fetched.status = "failed"
    print(f"  failed: {fetched.error}", flush=True)
    return fetched


def _worth_retrying(exc: Exception) -> bool:
    """Not for what another attempt cannot change: a repo, revision, file or split that does
    not exist, or no access to it."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    return not isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError,
                                EntryNotFoundError, MissingSplit, UserError))


class MissingSplit(Exception):
    pass


def _fetch_model(item: Item, cache_dir: Path) -> None:
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(item.repo, revision=item.revision, files_metadata=True)
    expected = {s.rfilename: s.size for s in info.siblings or []}
    ignore = NEVER_LOADED + (PICKLED_WEIGHTS if any(n.endswith(".safetensors") for n in expected)
                             else [])
    snapshot = Path(snapshot_download(item.repo, revision=item.revision, cache_dir=cache_dir / HUB,
                                      ignore_patterns=ignore))
    files = []
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        name, size = path.relative_to(snapshot).as_posix(), path.stat().st_size
        if expected.get(name) not in (None, size):
            raise OSError(f"{name}: {size} bytes downloaded, the hub lists {expected[name]}")
        files.append({"path": os.path.relpath(path, cache_dir), "size": size})
    item.commit, item.files = info.sha, files


def _fetch_dataset(item: Item, cache_dir: Path) -> None:
    loaded = _load_dataset(item, cache_dir=str(cache_dir / DATASETS),
                           download_mode="reuse_cache_if_exists")
    missing = [split for split in item.splits if split not in loaded]
    if missing:
        raise MissingSplit(f"split(s) {', '.join(missing)} not in the dataset (it has "
                           f"{', '.join(loaded)})")
    item.rows = {split: part.num_rows for split, part in loaded.items()}
    paths = dict.fromkeys(f["filename"] for part in loaded.values() for f in part.cache_files)
    item.files = [{"path": os.path.relpath(p, cache_dir), "size": os.path.getsize(p)}
                  for p in paths]


def _fetch_nemo_benchmark(item: Item, cache_dir: Path, nemo_env: str | None) -> None:
    from lmalign.evaluation import nemo

    prepared = nemo.prepare_data(nemo.ns_executable(nemo_env), item.repo,
                                 cache_dir / nemo.DATA_DIR / item.repo)
    item.rows = {prepared.name: _jsonl_rows(prepared)}
    item.files = [{"path": os.path.relpath(path, cache_dir), "size": path.stat().st_size}
                  for path in sorted(prepared.parent.rglob("*")) if path.is_file()]


def _jsonl_rows(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _load_dataset(item: Item, **kwargs):
    """The call lm-eval and lmalign's data loading make, so the run finds what this cached."""
    import datasets

    loaded = datasets.load_dataset(item.repo, name=item.subset, revision=item.revision,
                                   **item.load_kwargs, **kwargs)
    return loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _remove_damaged(item: Item, cache_dir: Path) -> None:
    """The libraries trust a file that exists: a truncated one must go before it is fetched."""
    for recorded in item.files:
        path = cache_dir / recorded["path"]
        if path.exists() and path.stat().st_size != recorded["size"]:
            target = path.resolve()
            path.unlink()
            if target != path and target.exists():
                target.unlink()  # the hub cache's blob behind the snapshot's link


def verify(cache_dir: Path) -> None:
    manifest = load_manifest(cache_dir)
    if manifest is None:
        raise UserError(problem("cache.dir", str(cache_dir), "has no manifest.json",
                                "a directory that stage=cache_prepare filled (or its unpacked "
                                "copy)", "point cache.dir at the unpacked cache, or run "
                                "stage=cache_prepare cache.dir=<dir> on a connected machine"))
    for line in version_warnings(manifest.versions):
        print(f"warning: {line}", flush=True)
    problems = []
    for item in manifest.items.values():
        found = _damage(item, cache_dir) or _load_problems(item, cache_dir)
        print(f"  {'ok' if not found else 'BROKEN':6}  {item.label}", flush=True)
        problems += [f"{item.label}: {what}" for what in found]
    nothing = [task for task, keys in manifest.tasks.items() if not keys]
    if nothing:
        print(f"  ok      eval tasks {', '.join(nothing)}: {LOCAL_TASK}", flush=True)
    if problems:
        fix = ("on the connected machine, re-run stage=cache_prepare cache.dir=<its cache> "
               "(it fetches missing items and replaces damaged files), then copy the cache here")
        raise JobFailed("\n".join(problems + [f"cache {cache_dir} is incomplete: {fix}"]))
    print(f"cache_verify: all {len(manifest.items)} item(s) load offline from {cache_dir}",
          flush=True)


def version_warnings(recorded: dict[str, str | None]) -> list[str]:
    here = library_versions()
    trap = {"datasets": "datasets caches from another major version may not load; "}
    return [f"the cache was written with {name} {version} and this machine has {here[name]}: "
            f"{trap.get(name, '')}install {name}=={version} here if loading fails"
            for name, version in recorded.items()
            if name in here and version and here[name] and version != here[name]
            and name in ("datasets", "huggingface_hub", "transformers")]


def _load_problems(item: Item, cache_dir: Path) -> list[str]:
    try:
        if item.kind == "model":
            return _load_model_parts(item)
        if item.kind == "nemo-benchmark":  # the jsonl files ns eval reads, row for row
            from lmalign.evaluation import nemo

            folder = cache_dir / nemo.DATA_DIR / item.repo
            return [f"{name} has {found} rows, {rows} expected" for name, rows in item.rows.items()
                    if (found := _jsonl_rows(folder / name)) != rows]
        loaded = _load_dataset(item)
        return [f"split {split} has {len(loaded[split]) if split in loaded else 'no'} rows, "
                f"{rows} expected" for split, rows in item.rows.items()
                if split not in loaded or len(loaded[split]) != rows]
    except Exception as exc:
        return [f"does not load offline: {type(exc).__name__}: {_first_line(exc)}"]


def _load_model_parts(item: Item) -> list[str]:
    """Config and tokenizer load; every safetensors header reads (no weights are loaded)."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(item.repo, revision=item.revision)
    snapshot = Path(snapshot_download(item.repo, revision=item.revision, local_files_only=True))
    if any((snapshot / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                   "tokenizer.model")):
        AutoTokenizer.from_pretrained(item.repo, revision=item.revision)
    found = []
    for path in sorted(snapshot.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as weights:
                weights.keys()
        except Exception as exc:
            found.append(f"corrupt safetensors file {path.name} ({_first_line(exc)})")
    return found


def pack(cache_dir: Path, part_gib: float | None) -> list[Path]:
    """<cache.dir>.tar.gz (or its parts), written under temporary names and renamed at the end."""
    from tqdm import tqdm

    base = cache_dir.with_name(cache_dir.name + ".tar.gz")
    for old in base.parent.glob(base.name + "*"):
        old.unlink()
    entries = sorted(p for p in cache_dir.rglob("*") if p.name != ".manifest.lock")
    total = sum(p.stat().st_size for p in entries if p.is_file() and not p.is_symlink())
    part_bytes = int(part_gib * 2**30) if part_gib else None
    with _Parts(base, part_bytes) as out, tarfile.open(fileobj=out, mode="w|gz") as tar, \
            tqdm(total=total, unit="B", unit_scale=True, desc="packing") as bar:
        for path in entries:
            tar.add(path, arcname=str(Path(cache_dir.name) / path.relative_to(cache_dir)),
                    recursive=False)
            if path.is_file() and not path.is_symlink():
                bar.update(path.stat().st_size)
    return out.finish()


class _Parts:
    """A write-only file that starts a new part every `limit` bytes."""

    def __init__(self, base: Path, limit: int | None):
        self.base, self.limit, self.paths, self.handle, self.written = base, limit, [], None, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.handle:
            self.handle.close()
        if exc_info[0] is not None:
            for path in self.paths:
                path.unlink(missing_ok=True)

    def _next(self) -> None:
        if self.handle:
            self.handle.close()
        name = self.base.name + (f".part-{len(self.paths):03d}" if self.limit else "")
        self.paths.append(self.base.with_name(name + ".partial"))
        self.handle, self.written = open(self.paths[-1], "wb"), 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.handle is None or (self.limit and self.written >= self.limit):
                self._next()
            room = len(view) if not self.limit else self.limit - self.written
            self.handle.write(view[:room])
            self.written += min(room, len(view))
            view = view[room:]
        return len(data)

    def flush(self) -> None:
        if self.handle:
            self.handle.flush()

    def finish(self) -> list[Path]:
        if self.handle:
            self.handle.close()
            self.handle = None
        done = [path.with_name(path.name.removesuffix(".partial")) for path in self.paths]
        for partial, final in zip(self.paths, done):
            partial.rename(final)
        return done


# ---------------------------------------------------------------------------------------------
# offline=true: what this run needs, checked against the manifest before anything loads.


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
        why = "not in its manifest" if kept is None else "; ".join(_damage(kept, cache_dir))
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
            why = "; ".join(_damage(kept, cache_dir)) if kept else "not in its manifest"
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bytes(count: int | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value} B"
