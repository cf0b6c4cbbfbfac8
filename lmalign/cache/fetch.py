"""stage=cache_prepare and cache_verify: fetch a manifest's items with huggingface_hub and
datasets into their own cache layouts (`hub/`, `datasets/`), recording each item's files, sizes
and row counts; then load every item with the offline switches on (docs/design.md, Offline
cache)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from lmalign.cache.manifest import (DATASETS, HUB, Item, damage, first_line, library_versions,
                                    load_manifest, manifest_path, size_text, updating)
from lmalign.cache.pack import pack
from lmalign.cache.plan import LOCAL_TASK, describe, plan
from lmalign.errors import JobFailed, UserError, problem
from lmalign.machine import hub_reachable
from lmalign.schema import Config

log = logging.getLogger(__name__)
# Never loaded by transformers from a hub repo: other frameworks' and exporters' files.
NEVER_LOADED = ["*.onnx", "*.onnx_data", "*.gguf", "*.h5", "*.msgpack", "*.tflite", "*.ot",
                "*.mlmodel", "onnx/*", "openvino/*", "coreml/*", "original/*"]
# Pickled weights, skipped when the repo has the same weights as safetensors.
PICKLED_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]


def run_stage(config: Config, overrides: list[str]) -> None:
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


def prepare(config: Config, cache_dir: Path) -> None:
    with updating(cache_dir) as manifest:
        manifest.merge(plan(config, manifest))
    todo = [item for item in manifest.items.values() if damage(item, cache_dir)]
    print(f"cache_prepare: {len(manifest.items)} item(s) in {manifest_path(cache_dir)}, "
          f"{len(todo)} to fetch", flush=True)
    from_hub = [item for item in todo if item.kind != "nemo-benchmark"]  # ns fetches its own
    if from_hub and not hub_reachable():  # else every item would fail slowly, one by one
        raise UserError(_no_network(len(todo), 0))
    for number, item in enumerate(todo, 1):
        print(f"[{number}/{len(todo)}] {item.label}", flush=True)
        _remove_damaged(item, cache_dir)
        fetched = _fetch_with_retries(item, cache_dir, config.cache.retries,
                                      config.eval.nemo.nemo_env if config.eval.nemo else None)
        with updating(cache_dir) as latest:  # each item is kept as soon as it is fetched
            latest.items[fetched.key] = fetched
        if fetched.status == "failed" and item.kind != "nemo-benchmark" and not hub_reachable():
            raise UserError(_no_network(len(todo), number - 1))
    with updating(cache_dir) as manifest:
        failed = [item for item in manifest.items.values() if item.status != "done"]
        manifest.versions = library_versions()
        manifest.prepare = {
            "total": len(manifest.items), "done": len(manifest.items) - len(failed),
            "failed": [{"item": item.label, "reason": item.error} for item in failed],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    total = sum(f["size"] for item in manifest.items.values() for f in item.files)
    print(f"cache_prepare: {manifest.prepare['done']} of {len(manifest.items)} item(s) in "
          f"{cache_dir} ({size_text(total)})", flush=True)
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


def _no_network(todo: int, fetched: int) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return problem("stage", "cache_prepare", f"the hub ({endpoint}) cannot be reached from this "
                   f"machine; {fetched} of {todo} item(s) fetched (kept)", "a machine that "
                   "reaches the hub (HF_ENDPOINT names a mirror)", "run the same command on a "
                   "connected machine, or again once the network is back: it fetches only what "
                   "is missing")


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
            fetched.error = f"{type(exc).__name__}: {first_line(exc)}"
            if attempt < retries and _worth_retrying(exc) and (
                    item.kind == "nemo-benchmark" or hub_reachable()):
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
    from lmalign.evaluation import nemo_skills

    prepared = nemo_skills.prepare_data(nemo_skills.ns_executable(nemo_env), item.repo,
                                        cache_dir / nemo_skills.DATA_DIR / item.repo)
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
        found = damage(item, cache_dir) or _load_problems(item, cache_dir)
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
            from lmalign.evaluation import nemo_skills

            folder = cache_dir / nemo_skills.DATA_DIR / item.repo
            return [f"{name} has {found} rows, {rows} expected" for name, rows in item.rows.items()
                    if (found := _jsonl_rows(folder / name)) != rows]
        loaded = _load_dataset(item)
        return [f"split {split} has {len(loaded[split]) if split in loaded else 'no'} rows, "
                f"{rows} expected" for split, rows in item.rows.items()
                if split not in loaded or len(loaded[split]) != rows]
    except Exception as exc:
        return [f"does not load offline: {type(exc).__name__}: {first_line(exc)}"]


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
            found.append(f"corrupt safetensors file {path.name} ({first_line(exc)})")
    return found
