"""NeMo-Skills (eval=nemo): its `ns eval` command line, and its results read back.

NeMo-Skills pins `datasets<4` and cannot share lmalign's environment: `ns` runs as a subprocess
from its own virtualenv (`eval.nemo_env`), with that environment first on PATH, because its
jobs call whatever `python` is there. `ns eval` has exited 0 with incomplete output (a scoring
crash) and having done nothing (its environment not on PATH), so completion is judged by its
files, never by its exit code: every `output*.jsonl` has its `.done` marker and `metrics.json`
exists. metrics.json holds `{benchmark: {eval_mode: {metric: value}}}` with values in percent;
lmalign's rows hold fractions (DESIGN: value in [0, 1] for every backend).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmalign import models
from lmalign.errors import JobFailed, UserError, problem
from lmalign.evaluation import cells, server
from lmalign.evaluation.cells import Target
from lmalign.schema import EvalConfig, HardwareConfig

log = logging.getLogger(__name__)

RESULTS_DIR = "eval-results"
INSTALL = ("python -m venv ~/venvs/nemo-skills && ~/venvs/nemo-skills/bin/pip install "
           "git+https://github.com/NVIDIA-NeMo/Skills.git (README: NeMo-Skills)")
# Per-benchmark counts and timings in metrics.json: not scores, not percentages.
NOT_SCORES = {"num_entries", "avg_tokens", "gen_seconds"}


@dataclass(frozen=True)
class Benchmark:
    name: str
    repeats: int | None  # gsm8k:4 -> 4 sampled runs (not few-shot); None: one greedy run

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.repeats}" if self.repeats else self.name


def parse_benchmarks(text: str) -> list[Benchmark]:
    """NeMo-Skills' own syntax: `gsm8k:4,ifeval`."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?::(\d+))?", part)
        if not match:
            raise UserError(problem("eval.benchmarks", text, f"cannot read {part!r}",
                                    "NeMo-Skills benchmarks, comma-separated, each optionally "
                                    "with :<repeats>", "eval.benchmarks=gsm8k:4,ifeval"))
        found.append(Benchmark(match.group(1), int(match.group(2)) if match.group(2) else None))
    return found


@lru_cache(maxsize=4)
def ns_executable(env: str | None) -> Path:
    """`ns` of NeMo-Skills' own environment; one line saying how to install it when missing."""
    where = Path(env).expanduser() / "bin" / "ns" if env else None
    if where is not None and where.exists():
        check = subprocess.run([str(where.parent / "python"), "-c", "import nemo_skills"],
                               capture_output=True, text=True)
        if check.returncode == 0:
            return where
    raise UserError(problem(
        "eval.nemo_env", env, "NeMo-Skills is not installed there" if env else
        "eval=nemo needs NeMo-Skills' own environment (it pins datasets<4, so it cannot share "
        "lmalign's)", "a virtualenv with NeMo-Skills installed (it has bin/ns)",
        f"{INSTALL}, then eval.nemo_env=~/venvs/nemo-skills"))


def flag_spelling(help_text: str, name: str) -> str:
    """typer >= 0.27 spells `--output_dir` as `--output-dir`: use what this `ns` accepts."""
    dashed = "--" + name.replace("_", "-")
    return dashed if dashed in help_text and f"--{name}" not in help_text else f"--{name}"


def eval_command(ns: Path, help_text: str, benchmarks: list[Benchmark], model: str,
                 base_url: str, output_dir: Path, expname: str, inference: dict[str, Any],
                 extra: list[str]) -> list[str]:
    """`ns eval` against a running OpenAI-compatible server, without a cluster (executor none)."""
    flag = lambda name: flag_spelling(help_text, name)  # noqa: E731
    return [str(ns), "eval", f"{flag('server_type')}=openai", f"{flag('model')}={model}",
            f"{flag('server_address')}={base_url}",
            f"{flag('benchmarks')}={','.join(b.spec for b in benchmarks)}",
            f"{flag('output_dir')}={output_dir}", f"{flag('expname')}={expname}",
            *[f"++inference.{key}={value}" for key, value in inference.items()], *extra]


@dataclass
class Outcome:
    benchmark: str
    complete: bool
    missing: list[str]  # what is absent when incomplete: .done markers, metrics.json
    metrics: dict[str, dict[str, Any]]  # eval_mode -> NeMo-Skills' metrics, as written


def read_benchmark(output_dir: Path, benchmark: Benchmark) -> Outcome:
    folder = output_dir / RESULTS_DIR / benchmark.name
    expected = ([f"output-rs{seed}.jsonl" for seed in range(benchmark.repeats)]
                if benchmark.repeats else ["output.jsonl"])
    missing = [f"{name}.done" for name in expected if not (folder / f"{name}.done").exists()]
    metrics_file = folder / "metrics.json"
    if not metrics_file.exists():
        missing.append("metrics.json")
    metrics = json.loads(metrics_file.read_text()).get(benchmark.name, {}) \
        if metrics_file.exists() else {}
    return Outcome(benchmark.name, not missing and bool(metrics), missing, metrics)


def metric_rows(outcome: Outcome) -> list[dict[str, Any]]:
    """One row per (eval mode, score): percentages as fractions, with the standard error
    across runs where NeMo-Skills reports one (`<metric>_statistics`)."""
    rows = []
    for mode, values in outcome.metrics.items():
        for name, value in values.items():
            if name in NOT_SCORES or isinstance(value, dict) or not isinstance(value, (int, float)):
                continue
            statistics = values.get(f"{name}_statistics") or {}
            stderr = statistics.get("std_err_across_runs")
            rows.append({"task": outcome.benchmark, "metric": name, "eval_mode": mode,
                         "value": value / 100,
                         "stderr": stderr / 100 if isinstance(stderr, (int, float)) else None,
                         "num_entries": values.get("num_entries")})
    return rows


# ---------------------------------------------------------------------------------------------
# Cells: one per checkpoint (all benchmarks of one `ns eval`), resumable like harness cells.


def settings(evaluation: EvalConfig) -> dict[str, Any]:
    """Everything that changes results; part of a cell's identity."""
    return {"backend": "nemo", "benchmarks": evaluation.benchmarks,
            "inference": dict(evaluation.inference or {}),
            "nemo_args": list(evaluation.nemo_args or [])}


def requested_cells(targets: list[Target], evaluation: EvalConfig, run_dir: Path) -> list[Path]:
    return [cells.cell_dir(run_dir, target, settings(evaluation)) for target in targets]


def check(evaluation: EvalConfig) -> Path:
    """Before any training: NeMo-Skills is there and the benchmarks read."""
    parse_benchmarks(str(evaluation.benchmarks))
    return ns_executable(evaluation.nemo_env)


def _ns_environment(ns: Path) -> dict[str, str]:
    """NeMo-Skills' jobs run `python -m nemo_skills...` with the `python` on PATH: its own."""
    env_dir = ns.parent.parent
    return {**os.environ, "PATH": f"{ns.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(env_dir)}


@lru_cache(maxsize=4)
def _eval_help(ns: Path, env: tuple[tuple[str, str], ...]) -> str:
    """`ns eval --help`, once per process (the watcher evaluates checkpoint after checkpoint)."""
    return subprocess.run([str(ns), "eval", "--help"], env=dict(env), capture_output=True,
                          text=True).stdout


def evaluate(targets: list[Target], evaluation: EvalConfig, run_dir: Path,
             hardware: HardwareConfig) -> None:
    ns = check(evaluation)
    env = _ns_environment(ns)
    help_text = _eval_help(ns, tuple(sorted(env.items())))
    benchmarks = parse_benchmarks(str(evaluation.benchmarks))
    for target in targets:
        cell = cells.cell_dir(run_dir, target, settings(evaluation))
        if cells.is_complete(cell):
            log.info("eval %s: nemo cell done, skipping", target.label)
            continue
        _serve_and_evaluate(target, evaluation, hardware, benchmarks, cell, ns, env, help_text)


def _serve_and_evaluate(target: Target, evaluation: EvalConfig, hardware: HardwareConfig,
                        benchmarks: list[Benchmark], cell: Path, ns: Path, env: dict[str, str],
                        help_text: str) -> None:
    if target.revision or models.adapter_config(target.path):
        raise UserError(problem(
            "eval.checkpoints", target.label, "eval=nemo serves full model directories; this "
            "is " + ("a hub revision" if target.revision else "an adapter"),
            "full models (final/ of a full fine-tune, merged/ of a LoRA run)",
            "stage=merge run_name=<run>, then evaluate merged/ (model.name_or_path=<run>/merged)"))
    # NeMo-Skills' own output files stay in the work directory until every benchmark is
    # complete: a re-run continues there (ns eval skips what has its .done), then it becomes
    # the cell at once.
    work = cell.with_name(cell.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    per_node = max(1, hardware.world_size // hardware.num_nodes)
    launch = server.Launch(str(evaluation.server), target.path, target.path,
                           hardware.accelerator, tensor_parallel=per_node)
    log.info("eval %s: NeMo-Skills %s -> %s", target.label, evaluation.benchmarks,
             work.relative_to(work.parent.parent.parent))
    with server.serving(launch, work / "server.log", float(evaluation.server_startup_timeout_s),
                        evaluation.server_address) as running:
        argv = eval_command(ns, help_text, benchmarks, target.path, running.base_url, work,
                            f"lmalign-{target.label}", dict(evaluation.inference or {}),
                            list(evaluation.nemo_args or []))
        with open(work / "ns_eval.log", "a") as output:
            output.write(f"$ {' '.join(argv)}\n")
            output.flush()
            code = subprocess.run(argv, cwd=work, env=env, stdout=output,
                                  stderr=subprocess.STDOUT).returncode
    outcomes = [read_benchmark(work, benchmark) for benchmark in benchmarks]
    incomplete = [o for o in outcomes if not o.complete]
    if incomplete:  # ns eval's exit status says nothing about this (it was {code})
        raise JobFailed("\n".join(
            f"eval {target.label}: NeMo-Skills did not complete {o.benchmark} (missing "
            f"{', '.join(o.missing)}; ns eval exited {code}); see {work / 'ns_eval.log'}; "
            "re-running continues from what is there" for o in incomplete))
    rows = [{"checkpoint": target.label, "step": target.step, "backend": "nemo",
             "num_fewshot": None, "group": None, **row}
            for outcome in outcomes for row in metric_rows(outcome)]
    cells.write_record(work, target, settings(evaluation), rows)
    os.replace(work, cell)
