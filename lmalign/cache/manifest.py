"""The offline cache's manifest: what a run needs from the hub (items), merged from the plans of
several runs, and what cache_prepare found when it fetched each (docs/design.md, Offline cache).
The manifest is the contract between the connected machine and the cluster; items are keyed by
what identifies them (repo, subset, revision, load arguments), so plans merge into one cache."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmalign import rundir

MANIFEST = "manifest.json"
HUB, DATASETS = "hub", "datasets"
# Whose versions the manifest records: a datasets cache written by another major version may
# not load (verify warns).
RECORDED_VERSIONS = ("datasets", "huggingface_hub", "transformers", "lm_eval", "lmalign")


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
            return size_text(sum(f["size"] for f in self.files))
        return f"~{size_text(self.estimated_bytes)} (est.)" if self.estimated_bytes else "-"


@dataclass
class Plan:
    items: list[Item]
    tasks: dict[str, list[str]]  # eval task as named -> keys of the items it loads
    local: list[str]  # what the run reads from this machine's own disk: copy it yourself



def keep(items: dict[str, Item], item: Item) -> Item:
    """The item under its key: a second request for it adds its splits and users."""
    kept = items.setdefault(item.key, item)
    if kept is not item:
        kept.splits = list(dict.fromkeys(kept.splits + item.splits))
        kept.needed_by = list(dict.fromkeys(kept.needed_by + item.needed_by))
    return kept



@dataclass
class Manifest:
    items: dict[str, Item] = field(default_factory=dict)
    tasks: dict[str, list[str]] = field(default_factory=dict)
    local: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    prepare: dict[str, Any] = field(default_factory=dict)

    def merge(self, found: Plan) -> None:
        for item in found.items:
            keep(self.items, item)
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
    return rundir.versions(RECORDED_VERSIONS)


def damage(item: Item, cache_dir: Path) -> list[str]:
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



def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def size_text(count: int | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value} B"
