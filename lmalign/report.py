"""Tables across runs: the method comparison of `+experiment=method_comparison` and its kin."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lmalign import rundir
from lmalign.evaluation.cells import METRICS_CSV

COMPARISON_FILE = "comparison.md"


def _final_metrics(run_dir: Path) -> dict[str, float]:
    path = run_dir / METRICS_CSV
    if not path.exists():
        return {}
    with open(path) as handle:
        return {f"{r['task']} {r['metric']}": float(r["value"]) for r in csv.DictReader(handle)
                if r["checkpoint"] == "final" and r["value"]}


def _run_row(run_dir: Path) -> dict[str, Any]:
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    train = rundir.read_record(run_dir).get("train") or {}
    trainable, total = train.get("trainable_parameters"), train.get("total_parameters")
    memory, seconds = train.get("peak_memory_mib"), train.get("train_runtime_s")
    start = f" <- {saved.model.init_from}" if saved.model.get("init_from") else ""
    return {
        "run": run_dir.name,
        "method": f"{saved.method.name}{start}",
        "trainable params": f"{trainable:,}" if trainable is not None else "-",
        "of total": f"{total:,}" if total is not None else "-",
        "trainable %": f"{100 * trainable / total:.2f}" if trainable and total else "-",
        "peak memory MiB": f"{memory:.0f}" if memory is not None else "-",
        "train time s": f"{seconds:.0f}" if seconds is not None else "-",
        **{name: f"{value:.3f}" for name, value in _final_metrics(run_dir).items()},
    }


def comparison_table(run_dirs: list[Path]) -> str:
    """One row per run, as a Markdown table: method, parameters, memory, time, final metrics."""
    rows = [_run_row(Path(d)) for d in run_dirs]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = [columns, ["---"] * len(columns)] + [[row.get(c, "-") for c in columns]
                                                for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |"
                     for line in lines)


def write_comparison(run_dirs: list[Path], directory: Path) -> str:
    table = comparison_table(run_dirs)
    note = ("\nPeak memory: the CUDA allocator's peak on a GPU; on a CPU the growth of resident "
            "memory while training. Metrics: the final model, lm-eval, fraction in [0, 1].\n")
    rundir.atomic_write_text(Path(directory) / COMPARISON_FILE, table + "\n" + note)
    return table
