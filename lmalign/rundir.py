"""The run directory: atomic files, run.json, and which checkpoints are complete (DESIGN)."""

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

log = logging.getLogger(__name__)
RUN_RECORD = "run.json"
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


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
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
    """run.json: what ran, where, with which versions, how it ended. Rewritten atomically."""

    def __init__(self, run_dir: Path, stage: str):
        self.path = Path(run_dir) / RUN_RECORD
        self.data: dict[str, Any] = read_record(run_dir)
        attempt = {"stage": stage, "argv": list(sys.argv), "started": _now(), "status": "running"}
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

    def finish(self, status: str, **fields: Any) -> None:
        self.data["attempts"][-1].update(status=status, ended=_now())
        self.data.update(status=status, ended=_now(), **fields)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
