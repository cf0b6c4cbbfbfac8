"""Evaluated cells: one (checkpoint, backend, task set, few-shot, settings) each, written atomically.

A cell directory holds the backend's own files and `cell.json`, written last; a cell without it
is incomplete and evaluated again. `metrics.csv` is rebuilt from the cells, never appended to.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmalign.rundir import atomic_write_json, atomic_write_text
from lmalign.tables import aligned

CELL_RECORD = "cell.json"
METRICS_CSV = "metrics.csv"
METRICS_COLUMNS = ["checkpoint", "step", "backend", "task", "metric", "num_fewshot", "eval_mode",
                   "value", "stderr", "ci_low", "ci_high", "settings", "settings_hash", "cell",
                   "group"]
# Columns of their own: never part of the readable `settings` that tells cells apart (a
# judge's rubric is its eval_mode).
_OWN_COLUMNS = ("backend", "tasks", "num_fewshot", "benchmarks", "rubric")


@dataclass(frozen=True)
class Target:
    """One model to evaluate: `label` is base, final, checkpoint-<step> or a hub revision."""

    label: str
    step: int | None
    path: str
    revision: str | None = None


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def content_hash(path: Path) -> str | None:
    """A file's or directory's content, for the identity of cells that read a user's file: an
    edited file makes new cells."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if file.exists():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16] if files else None


def cell_dir(run_dir: Path, target: Target, settings: dict[str, Any]) -> Path:
    shots = f"-fs{settings['num_fewshot']}" if "num_fewshot" in settings else ""
    name = f"{settings['backend']}{shots}-{settings_hash(settings)}"
    return Path(run_dir) / "eval" / target.label / name


def is_complete(cell: Path, need_samples: bool = False) -> bool:
    record = cell / CELL_RECORD
    if not record.exists():
        return False
    return not need_samples or json.loads(record.read_text()).get("has_samples", False)


def write_record(staging: Path, target: Target, settings: dict[str, Any],
                 rows: list[dict[str, Any]], **extra: Any) -> None:
    atomic_write_json(staging / CELL_RECORD, {
        "checkpoint": target.label, "step": target.step, "model": target.path,
        "revision": target.revision, "settings": settings, "settings_hash":
        settings_hash(settings), "rows": rows, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra})


def collect_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every row of every complete cell. `settings` names what tells a cell apart from the
    run's other cells of its backend (`limit=20;seed=1`), so rows of different settings are
    never read as one; `settings_hash` is the cell's full identity."""
    cells = [(record, json.loads(record.read_text()))
             for record in sorted((Path(run_dir) / "eval").glob(f"*/*/{CELL_RECORD}"))]

    def kind(settings: dict[str, Any]) -> tuple:  # cells whose rows share their metric names
        return settings.get("backend"), settings.get("rubric")

    varying: dict[tuple, set[str]] = {}
    for found in {kind(cell["settings"]) for _, cell in cells}:
        same = [cell["settings"] for _, cell in cells if kind(cell["settings"]) == found]
        keys = {key for settings in same for key in settings} - set(_OWN_COLUMNS)
        varying[found] = {key for key in keys
                          if len({json.dumps(s.get(key), sort_keys=True) for s in same}) > 1}
    rows = []
    for record, cell in cells:
        settings = cell["settings"]
        shown = ";".join(f"{key}={_text(settings.get(key))}"
                         for key in sorted(varying[kind(settings)]))
        for row in cell["rows"]:
            rows.append({**row, "settings": shown,
                         "settings_hash": cell.get("settings_hash") or settings_hash(settings),
                         "cell": str(record.parent.relative_to(run_dir))})
    return rows


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def rebuild_metrics_csv(run_dir: Path) -> list[dict[str, Any]]:
    rows = collect_rows(run_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(run_dir) / METRICS_CSV, buffer.getvalue())
    return rows


def checkpoint_order(label: str) -> tuple[int, int, str]:
    if label == "base":
        return (0, 0, label)
    if label.startswith("checkpoint-") and label[11:].isdigit():
        return (1, int(label[11:]), label)
    return (2 if label == "final" else 1, 0, label)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """task | metric | few-shot | one column per checkpoint | delta (last - first)."""
    labels = sorted({r["checkpoint"] for r in rows}, key=checkpoint_order)
    grouped: dict[tuple, dict[str, float]] = {}
    for r in rows:
        key = (r["task"], r["metric"], r["eval_mode"], r["num_fewshot"], r.get("settings") or "")
        grouped.setdefault(key, {})[r["checkpoint"]] = r["value"]
    varied = any(key[4] for key in grouped)  # a column only when cells differ in settings
    header = ["task", "metric", "fewshot", *(["settings"] if varied else []), *labels] + (
        ["delta"] if len(labels) > 1 else [])
    lines = [header]
    for (task, metric, mode, shots, settings), values in sorted(grouped.items(), key=str):
        shown = [f"{values[l]:.3f}" if l in values else "-" for l in labels]
        row = [task, metric if mode == "none" else f"{metric} ({mode})",
               str(shots) if shots is not None else "-",
               *([settings or "-"] if varied else []), *shown]
        if len(labels) > 1:
            first, last = values.get(labels[0]), values.get(labels[-1])
            row.append(f"{last - first:+.3f}" if first is not None and last is not None else "-")
        lines.append(row)
    return "\n".join(line.rstrip() for line in aligned(lines))
