"""Tables across runs: the method comparison of `+experiment=method_comparison`, and
`stage=report`'s summary of every evaluated cell of a sweep or run (CSV, Markdown, plots)."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmalign import rundir
from lmalign.tables import markdown
from lmalign.evaluation.cells import METRICS_CSV, collect_rows

COMPARISON_FILE = "comparison.md"


def _final_metrics(run_dir: Path) -> dict[str, float]:
    path = run_dir / METRICS_CSV
    if not path.exists():
        return {}
    with open(path) as handle:
        return {f"{r['task']} {r['metric']}": float(r["value"]) for r in csv.DictReader(handle)
                if r["checkpoint"] == "final" and r["value"]}


def _run_row(run_dir: Path) -> dict[str, Any]:
    saved = rundir.saved_config(run_dir)
    train = rundir.read_record(run_dir).get("train") or {}
    trainable, total = train.get("trainable_parameters"), train.get("total_parameters")
    memory, seconds = train.get("peak_memory_mib"), train.get("train_runtime_s")
    start = f" <- {saved.model.init_from}" if saved.model.init_from else ""
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


def _synthesized(run_dir: Path) -> str | None:
    """A stage=synthesize arm's one line (its data, not a method), or None for a training run."""
    counts = rundir.read_record(run_dir).get("synth")
    if counts is None:
        return None
    return (f"{run_dir.name}: {counts.get('instructions kept', 0)} instructions kept of "
            f"{counts.get('instructions generated', 0)}, {counts.get('sft rows', 0)} SFT rows, "
            f"{counts.get('preference pairs', 0)} preference pairs ({run_dir / 'synth.md'})")


def comparison_table(run_dirs: list[Path]) -> str:
    """One row per training run, as a Markdown table: method, parameters, memory, time, final
    metrics; a synthesize arm is a line above it."""
    data = [line for line in (_synthesized(Path(d)) for d in run_dirs) if line]
    rows = [_run_row(Path(d)) for d in run_dirs if _synthesized(Path(d)) is None]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    table = markdown([columns] + [[row.get(c, "-") for c in columns] for row in rows],
                     padded=True) if rows else []
    return "\n".join([f"data: {line}" for line in data] + ([""] if data else []) + table)


def write_comparison(run_dirs: list[Path], directory: Path) -> str:
    table = comparison_table(run_dirs)
    note = ("\nPeak memory: the CUDA allocator's peak on a GPU; on a CPU the growth of resident "
            "memory while training. Metrics: the final model, lm-eval, fraction in [0, 1].\n")
    rundir.atomic_write_text(Path(directory) / COMPARISON_FILE, table + "\n" + note)
    return table


# ---------------------------------------------------------------------------------------------
# stage=report: every evaluated cell of a sweep or run, collated into one table and plots.

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PLOTS_DIR = "plots"
JOBS_DIR = "jobs"            # <sweep>/jobs/<num>.json: one per started job (callbacks.py)
EXPECTED_JOBS = "expected.json"
SUMMARY_COLUMNS = ["job", "overrides", "checkpoint", "step", "backend", "task", "group", "metric",
                   "num_fewshot", "eval_mode", "value", "stderr", "ci_low", "ci_high", "settings",
                   "settings_hash", "run_dir", "cell"]
# Keys whose values are a plot's x axis or its lines, not separate experiments.
_AXIS_KEYS = ("eval.harness.num_fewshot", "eval.checkpoints", "eval.revisions", "model.revision")


@dataclass(frozen=True)
class Job:
    name: str
    overrides: list[str]
    run_dir: Path | None
    status: str  # done | failed | missing | did not finish
    error: str | None = None
    cells: list[str] | None = None  # the cells a sweep job asked for (jobs may share a run)
    cluster_log: str | None = None  # a cluster job's own log (submitit's)

    @property
    def log(self) -> str:
        if self.cluster_log:
            return self.cluster_log
        return str(self.run_dir / "lmalign.log") if self.run_dir else "never started"


def jobs_of(directory: Path) -> list[Job]:
    """The jobs behind a sweep directory (from its job records), or the run directory itself."""
    directory = Path(directory)
    records = directory / JOBS_DIR
    if not (records / EXPECTED_JOBS).exists():
        runs = [directory] if _is_run(directory) else sorted(
            p for p in directory.iterdir() if p.is_dir() and _is_run(p))
        return [Job(run.name, _overrides(run), run, _run_status(run)) for run in runs]
    expected = json.loads((records / EXPECTED_JOBS).read_text())
    found = []
    for number, overrides in enumerate(expected):
        record = records / f"{number}.json"
        if not record.exists():
            found.append(Job(str(number), overrides, None, "missing"))
            continue
        job = json.loads(record.read_text())
        status = job["status"]
        run_dir = Path(job["run_dir"]) if job["run_dir"] else None
        if status == "running" and (run_dir is None or _run_status(run_dir) != "running"):
            status = "did not finish"  # killed, or its node was lost
        found.append(Job(str(number), job["overrides"], run_dir, status, job.get("error"),
                         job.get("cells"), job.get("log")))
    return found


def _is_run(path: Path) -> bool:
    return (path / "eval").is_dir() or (path / rundir.RUN_RECORD).exists()


def _run_status(run_dir: Path) -> str:
    status = rundir.read_record(run_dir).get("status")
    return {"done": "done", None: "missing", "running": "running"}.get(status, "failed")


def _overrides(run_dir: Path) -> list[str]:
    return rundir.saved_overrides(run_dir)


def job_variants(jobs: list[Job]) -> dict[str, str]:
    """What tells each job's experiment apart: overrides not shared by all, beside the axes."""
    shared = set.intersection(*(set(job.overrides) for job in jobs)) if jobs else set()
    return {job.name: " ".join(o for o in job.overrides if o not in shared
                               and o.split("=", 1)[0].lstrip("+~") not in _AXIS_KEYS)
            for job in jobs}


def summary_rows(jobs: list[Job]) -> list[dict[str, Any]]:
    variants = job_variants(jobs)
    rows = []
    for job in jobs:
        if job.run_dir is None or not job.run_dir.exists():
            continue
        variant = variants[job.name]
        writers = rundir.cell_writers(job.run_dir)
        for row in collect_rows(job.run_dir):
            if job.cells is not None and row["cell"] not in job.cells:
                continue
            shown = " ".join(p for p in (variant, f"[{row['settings']}]" if row.get("settings")
                                         else "") if p)
            # The command that wrote the cell (a later stage=eval's, not the training's).
            overrides = writers.get(row["cell"], job.overrides)
            rows.append({**row, "job": job.name, "overrides": " ".join(overrides),
                         "variant": shown, "run_dir": str(job.run_dir)})
    return rows


def trouble_lines(jobs: list[Job]) -> list[str]:
    """One line per job that is not done: its overrides, status and where its log is."""
    return [f"  job {job.name} ({' '.join(job.overrides)}): {job.status}"
            f"{f' ({job.error})' if job.error else ''}; log: {job.log}"
            for job in jobs if job.status != "done"]


def collate(directory: Path) -> tuple[list[Job], list[dict[str, Any]]]:
    """Write summary.csv, summary.md and plots/ into `directory`; failed and missing jobs are
    listed, the rest still collated. Returns (jobs, rows)."""
    directory = Path(directory)
    jobs = jobs_of(directory)
    rows = summary_rows(jobs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=_row_order))
    rundir.atomic_write_text(directory / SUMMARY_CSV, buffer.getvalue())
    plots = write_plots(rows, directory / PLOTS_DIR)
    rundir.atomic_write_text(directory / SUMMARY_MD, summary_markdown(jobs, rows, plots,
                                                                      directory))
    if len(jobs) > 1 or directory not in [job.run_dir for job in jobs]:
        from lmalign.evaluation import generate

        variants = job_variants(jobs)
        present = [job for job in jobs if job.run_dir is not None and job.run_dir.exists()]
        several = len({job.run_dir for job in present}) > 1
        generate.write_samples_of({variants[job.name] or (job.name if several else ""):
                                   job.run_dir for job in present},
                                  directory / generate.SAMPLES_MD)
    return jobs, rows


def _row_order(row: dict[str, Any]) -> tuple:
    step = row.get("step")
    return (row["task"], row["metric"], row["eval_mode"], _variant(row), row["num_fewshot"] or 0,
            step if isinstance(step, int) else -1, row["checkpoint"])


def _variant(row: dict[str, Any]) -> str:
    return row.get("variant", "")  # set by summary_rows; rows of a single run have none


def _series(rows: list[dict[str, Any]]) -> dict[tuple, dict[tuple, list[tuple[int, float]]]]:
    """{(task, metric, mode): {(variant, few-shot): [(step, value)]}} for rows with a step."""
    found: dict[tuple, dict[tuple, list[tuple[int, float]]]] = {}
    for row in rows:
        if not isinstance(row.get("step"), int) or row.get("value") is None or row.get("group"):
            continue  # a group's subtasks (mmlu's 57) are tabled, not plotted
        lines = found.setdefault((row["task"], row["metric"], row["eval_mode"]), {})
        lines.setdefault((_variant(row), row["num_fewshot"]), []).append(
            (row["step"], row["value"]))
    return found


def write_plots(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """One PNG per task and metric: the metric against checkpoint step, a line per few-shot."""
    series = _series(rows)
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for (task, metric, mode), lines in sorted(series.items()):
        figure, axes = pyplot.subplots(figsize=(6, 4))
        for (variant, shots), points in sorted(lines.items(), key=str):
            points = sorted(set(points))
            label = (f"{shots}-shot" if shots is not None else metric) + (
                f" {variant}" if variant else "")
            axes.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
        axes.set_xlabel("step")
        axes.set_ylabel(metric if mode == "none" else f"{metric} ({mode})")
        axes.set_title(task)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task}_{metric}_{mode}") + ".png"
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=100)
        rundir.atomic_write_bytes(directory / name, image.getvalue())
        pyplot.close(figure)
        written.append(directory / name)
    return written


def summary_markdown(jobs: list[Job], rows: list[dict[str, Any]], plots: list[Path],
                     directory: Path) -> str:
    counts = {s: sum(j.status == s for j in jobs) for s in dict.fromkeys(j.status for j in jobs)}
    lines = ["# Summary", "", f"{len(jobs)} job(s): " + ", ".join(
        f"{n} {s}" for s, n in counts.items()) + ".", ""]
    troubled = [j for j in jobs if j.status != "done"]
    if troubled:
        lines += ["| job | overrides | status | log |", "| --- | --- | --- | --- |"]
        for job in troubled:
            why = f" ({job.error})" if job.error else ""
            lines.append(f"| {job.name} | {' '.join(job.overrides)} | {job.status}{why} | "
                         f"{job.log} |")
        lines.append("")
    tables: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        tables.setdefault((row["task"], row["metric"], row["eval_mode"]), []).append(row)
    groups = {row["group"] for row in rows if row.get("group")}
    subtasks = {row["task"] for row in rows if row.get("group")}
    for (task, metric, mode), found in sorted(tables.items()):
        if task in subtasks:
            continue  # a group's subtasks are tabled under the group, below
        lines += _metric_table(task, metric, mode, found)
    for group in sorted(groups):
        lines += _subtask_table(group, [r for r in rows if r.get("group") == group])
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(directory)})" for p in plots]
    return "\n".join(lines) + "\n"


def _metric_table(task: str, metric: str, mode: str, rows: list[dict[str, Any]]) -> list[str]:
    shots = sorted({r["num_fewshot"] for r in rows}, key=lambda s: (s is None, s))
    cells: dict[tuple, dict[Any, float]] = {}
    for row in rows:
        key = (_variant(row), row["checkpoint"], row.get("step"))
        cells.setdefault(key, {})[row["num_fewshot"]] = _shown(row)
    name = metric if mode == "none" else f"{metric} ({mode})"
    table = [["experiment", "checkpoint", "step",
              *(f"{s}-shot" if s is not None else "value" for s in shots)]]
    for (variant, checkpoint, step), values in sorted(cells.items(), key=lambda item: (
            item[0][0], item[0][2] if isinstance(item[0][2], int) else -1, item[0][1])):
        table.append([variant or "-", checkpoint, str(step) if step is not None else "-",
                      *(values.get(s) or "-" for s in shots)])
    return [f"## {task}: {name}", "", *markdown(table), ""]


COUNTS = {("judge", "invalid")}  # (backend, metric) of rows that count, shown as integers


def _shown(row: dict[str, Any]) -> str | None:
    """The value, and its 95% interval where the backend gives one (a judge's)."""
    if row.get("value") in (None, ""):
        return None
    if (row.get("backend"), row.get("metric")) in COUNTS:
        return f"{float(row['value']):.0f}"
    shown = f"{float(row['value']):.4f}"
    if row.get("ci_low") not in (None, "") and row.get("ci_high") not in (None, ""):
        shown += f" [{float(row['ci_low']):.2f}, {float(row['ci_high']):.2f}]"
    return shown


def _subtask_table(group: str, rows: list[dict[str, Any]]) -> list[str]:
    """A group's subtasks, best first, one column per (checkpoint, few-shot)."""
    columns = sorted({(r["checkpoint"], r.get("step"), r["num_fewshot"], _variant(r))
                      for r in rows}, key=lambda c: (c[3], c[1] if isinstance(c[1], int) else -1,
                                                     c[0], c[2] or 0))
    metric = next((m for m in ("acc", "acc_norm", "exact_match") if any(
        r["metric"] == m for r in rows)), rows[0]["metric"])
    values: dict[str, dict[tuple, float]] = {}
    for row in rows:
        if row["metric"] == metric:
            key = (row["checkpoint"], row.get("step"), row["num_fewshot"], _variant(row))
            values.setdefault(row["task"], {})[key] = row["value"]
    last = columns[-1]
    ordered = sorted(values.items(), key=lambda item: -(item[1].get(last) or 0))
    header = [f"{c[0]} {c[2]}-shot" + (f" {c[3]}" if c[3] else "") for c in columns]
    table = [["subtask", *header]] + [
        [task, *(f"{found[c]:.4f}" if found.get(c) is not None else "-" for c in columns)]
        for task, found in ordered]
    return [f"## {group}: subtasks by {metric} (best first, by the last column)", "",
            *markdown(table), ""]


RESULTS_ZIP = "results.zip"
_RUN_FILES = ("metrics.csv", "run.json", rundir.CONFIG_RECORD, "summary.*", "samples.md",
              "plots/*.png", ".hydra/**/*.yaml", "jobs/*.json")
# cell.json, lm-eval's results_* and samples_*, generations.jsonl; NeMo-Skills' metrics.json
# and outputs per benchmark (not the benchmark data a cell links to).
_CELL_FILES = ("*.json", "*.jsonl", "eval-results/**/*.json", "eval-results/**/*.jsonl")


def pack(directory: Path, jobs: list[Job]) -> Path:
    """The result files (no weights) of a sweep or run in one zip, for submission or sharing:
    summaries, plots, metrics, lm-eval's results and samples, and the configs that made them.
    A sweep job contributes the cells it asked for, not everything its run directory holds."""
    import zipfile

    directory = Path(directory).resolve()
    members: dict[str, Path] = {}

    def add(root: Path, prefix: str, patterns: tuple[str, ...]) -> None:
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                if path.is_file():
                    members.setdefault(prefix + str(path.relative_to(root)), path)

    add(directory, "", _RUN_FILES)
    for job in jobs:
        if job.run_dir is None or not job.run_dir.exists():
            continue
        run_dir = job.run_dir.resolve()
        if run_dir == directory:
            prefix = ""
        elif run_dir.is_relative_to(directory):
            prefix = f"{run_dir.relative_to(directory)}/"
        else:
            prefix = f"runs/{run_dir.name}/"
        add(run_dir, prefix, _RUN_FILES)
        chosen = job.cells if job.cells is not None else [
            str(p.relative_to(run_dir)) for p in run_dir.glob("eval/*/*") if p.is_dir()]
        for cell in chosen:
            add(run_dir, prefix, tuple(f"{cell}/{f}" for f in _CELL_FILES))
    with rundir.staged_file(directory / RESULTS_ZIP) as staging:
        with zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, path in sorted(members.items()):
                archive.write(path, name)
    return directory / RESULTS_ZIP
