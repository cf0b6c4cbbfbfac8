"""NeMo-Skills' own interface: its `ns` command lines, what it knows of each benchmark, its
prepared data and its result files read back.

NeMo-Skills pins `datasets<4` and cannot share lmalign's environment: `ns` runs as a subprocess
from its own virtualenv (`eval.nemo.nemo_env`), with that environment first on PATH, because its
jobs call whatever `python` is there. `ns eval` has exited 0 with incomplete output (a scoring
crash) and having done nothing (its environment not on PATH), so completion is judged by its
files, never by its exit code: every `output*.jsonl` has its `.done` marker and `metrics.json`
exists. metrics.json holds `{benchmark: {eval_mode: {metric: value}}}` with values in percent;
lmalign's rows hold fractions (docs/design.md, Evaluation backends: value in [0, 1]).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmalign import rundir
from lmalign.errors import UserError, problem
from lmalign.schema import EvalConfig, JudgeConfig

RESULTS_DIR = "eval-results"
DATA_DIR = "nemo-skills"  # under cache.dir: each benchmark's data, as ns prepare_data left it
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
            raise UserError(problem("eval.nemo.benchmarks", text, f"cannot read {part!r}",
                                    "NeMo-Skills benchmarks, comma-separated, each optionally "
                                    "with :<repeats>", "eval.nemo.benchmarks=[gsm8k:4,ifeval]"))
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
        "eval.nemo.nemo_env", env, "NeMo-Skills is not installed there" if env else
        "eval=nemo needs NeMo-Skills' own environment (it pins datasets<4, so it cannot share "
        "lmalign's)", "a virtualenv with NeMo-Skills installed (it has bin/ns)",
        f"{INSTALL}, then eval.nemo.nemo_env=~/venvs/nemo-skills"))


# Run with NeMo-Skills' own python: what it knows of each benchmark (its dataset module's
# settings), without building anything. A module that exists but fails to import raises.
_CATALOG_QUERY = r"""
import importlib, json, os, re, sys
import nemo_skills.dataset as datasets
root = os.path.dirname(datasets.__file__)
found = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module("nemo_skills.dataset." + name)
    except ModuleNotFoundError as exc:
        if exc.name != "nemo_skills.dataset." + name:
            raise
        continue
    found[name] = {"split": getattr(module, "EVAL_SPLIT", "test"),
                   "judge": getattr(module, "JUDGE_PIPELINE_ARGS", None) or None,
                   "group": bool(getattr(module, "IS_BENCHMARK_GROUP", False)),
                   "container": None}
    # Scoring that runs a tool only NeMo-Skills' container has (ifeval: /opt/benchmarks/...).
    kind = re.search(r"\+\+eval_type=(\S+)", getattr(module, "EVAL_ARGS", "") or "")
    if kind:
        try:
            import inspect
            from nemo_skills.evaluation import evaluator
            scorer = getattr(evaluator, "EVALUATOR_MAP", {}).get(kind.group(1)) or getattr(
                evaluator, "EVALUATOR_CLASS_MAP", {}).get(kind.group(1))
            where = re.search(r"/opt/benchmarks/[\w.-]+", inspect.getsource(
                inspect.getmodule(scorer))) if scorer else None
            found[name]["container"] = where.group(0) if where else None
        except Exception:
            pass
known = sorted(n for n in os.listdir(root) if os.path.exists(os.path.join(root, n, "__init__.py")))
print(json.dumps({"root": root, "benchmarks": found, "known": known}, default=str))
"""


@dataclass(frozen=True)
class Catalog:
    root: Path  # nemo_skills/dataset in NeMo-Skills' environment (ns prepare_data writes there)
    # name -> split, judge (its default), group, container (a path only NeMo-Skills' container
    # has, which its scoring needs)
    benchmarks: dict[str, dict[str, Any]]
    known: list[str]


@lru_cache(maxsize=8)
def catalog(ns: Path, names: tuple[str, ...]) -> Catalog:
    found = subprocess.run([str(ns.parent / "python"), "-c", _CATALOG_QUERY, *names],
                           env=ns_environment(ns), capture_output=True, text=True)
    if found.returncode != 0:
        raise UserError(problem("eval.nemo.nemo_env", str(ns.parent.parent), "NeMo-Skills there "
                                "cannot read its benchmarks: " + " ".join(
                                    found.stderr.strip().splitlines()[-1:]),
                                "a working NeMo-Skills installation", INSTALL))
    data = json.loads(found.stdout.strip().splitlines()[-1])
    return Catalog(Path(data["root"]), data["benchmarks"], data["known"])


def judge_key_variable(evaluation: EvalConfig, default_judge: dict[str, Any] | None) -> str | None:
    """The environment variable the judge's API key must be in (NeMo-Skills reads it there):
    eval.nemo.judge.api_key_env, else NeMo-Skills' own choice by the judge's address."""
    judge = evaluation.nemo.judge
    if judge.server:
        return None  # lmalign serves it, without a key
    if judge.api_key_env:
        return judge.api_key_env
    address = judge.base_url or (default_judge or {}).get("server_address") or ""
    if "api.nvidia.com" in address:
        return "NVIDIA_API_KEY"
    return "OPENAI_API_KEY" if "api.openai.com" in address else None


def is_judged(evaluation: EvalConfig) -> bool:
    return evaluation.nemo.judge.chosen


def flag_spelling(help_text: str, name: str) -> str:
    """typer >= 0.27 spells `--output_dir` as `--output-dir`: use what this `ns` accepts."""
    dashed = "--" + name.replace("_", "-")
    return dashed if dashed in help_text and f"--{name}" not in help_text else f"--{name}"


def eval_command(ns: Path, help_text: str, benchmarks: list[Benchmark], model: str,
                 base_url: str, output_dir: Path, expname: str, inference: dict[str, Any],
                 extra: list[str], judge: JudgeConfig | None = None,
                 data_dir: Path | None = None) -> list[str]:
    """`ns eval` against a running OpenAI-compatible server, without a cluster (executor none).
    The judge's key is named (++server.api_key_env_var), never given."""
    flag = lambda name: flag_spelling(help_text, name)  # noqa: E731
    argv = [str(ns), "eval", f"{flag('server_type')}=openai", f"{flag('model')}={model}",
            f"{flag('server_address')}={base_url}",
            f"{flag('benchmarks')}={','.join(b.spec for b in benchmarks)}",
            f"{flag('output_dir')}={output_dir}", f"{flag('expname')}={expname}"]
    if data_dir:
        argv.append(f"{flag('data_dir')}={data_dir}")
    for flag_name, key in (("model", "model"), ("server_type", "server_type"),
                           ("server_address", "base_url")):
        value = getattr(judge, key) if judge else None
        if value:
            argv.append(f"{flag('judge_' + flag_name)}={value}")
    judge_args = judge_generation_args(judge) if judge else []
    if judge_args:
        argv.append(f"{flag('extra_judge_args')}={' '.join(judge_args)}")
    return argv + [f"++inference.{key}={value}" for key, value in inference.items()] + extra


def judge_generation_args(judge: JudgeConfig) -> list[str]:
    """The judge block's settings as NeMo-Skills' judge generation takes them
    (--extra_judge_args, which ns splits at spaces: judge_problems refuses values with
    any)."""
    found = [f"++server.api_key_env_var={judge.api_key_env}"] if judge.api_key_env else []
    if judge.concurrency:
        found.append(f"++max_concurrent_requests={judge.concurrency}")
    if judge.request_timeout_s:
        found.append(f"++inference.timeout={judge.request_timeout_s:g}")
    found += [f"++inference.extra_body.{key}={_scalar(value)}"
              for key, value in judge.extra.items()]
    return found + list(judge.args)


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def judge_problems(judge: JudgeConfig) -> list[str]:
    """The judge block before anything runs: a served judge names its model; extra values
    survive ns's split at spaces."""
    problems = []
    if judge.server and not judge.model:
        problems.append(problem("eval.nemo.judge.model", None, f"eval.nemo.judge.server="
                                f"{judge.server} serves the judge model, and none is named",
                                "a hub id or a model directory", "eval.nemo.judge.model=<id or "
                                "directory>, or eval.nemo.judge.server=null"))
    for key, value in judge.extra.items():
        if isinstance(value, (dict, list)) or any(c.isspace() for c in _scalar(value)):
            problems.append(problem(
                f"eval.nemo.judge.extra.{key}", value, "ns eval takes its judge's arguments as "
                "one string split at spaces", "a string, number or boolean without spaces",
                f"+eval.nemo.judge.extra.{key}=<value without spaces>"))
    for argument in judge.args:
        if not argument.startswith("++") or any(c.isspace() for c in argument):
            problems.append(problem(
                "eval.nemo.judge.args", argument, "ns eval passes these to its judge's "
                "generation as one string split at spaces", "'++key=value' items without "
                "spaces", "eval.nemo.judge.args=['++prompt_config=judge/math']"))
    return problems


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


def ns_environment(ns: Path) -> dict[str, str]:
    """NeMo-Skills' jobs run `python -m nemo_skills...` with the `python` on PATH: its own."""
    env_dir = ns.parent.parent
    return {**os.environ, "PATH": f"{ns.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(env_dir)}


@lru_cache(maxsize=4)
def eval_help(ns: Path, env: tuple[tuple[str, str], ...]) -> str:
    """`ns eval --help`, once per process (the watcher evaluates checkpoint after checkpoint).
    typer draws it with rich at the terminal's width, cutting long option names
    (`--server_addre…`) at 80 columns: drawn wide here, every name is whole."""
    return subprocess.run([str(ns), "eval", "--help"], env={**dict(env), "COLUMNS": "400"},
                          capture_output=True, text=True).stdout


def prepare_data(ns: Path, name: str, target: Path) -> Path:
    """`ns prepare_data <name>`, which without a cluster writes into NeMo-Skills' own
    nemo_skills/dataset/<name>/, then that folder copied whole to `target` (ns eval's
    --data_dir layout). Judged by the file ns eval reads, never by the exit status. Returns
    that file in `target`."""
    found = catalog(ns, (name,))
    info = found.benchmarks.get(name)
    if info is None or info["group"]:
        raise UserError(problem(
            "eval.nemo.benchmarks", name, "a benchmark group (cache its members)" if info else
            f"not a benchmark of the NeMo-Skills in {ns.parent.parent}",
            ", ".join(found.known), "list the benchmarks themselves in eval.nemo.benchmarks"))
    source = found.root / name
    split = source / f"{info['split']}.jsonl"
    # An older copy from an earlier prepare must not pass for this one's result.
    split.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        code = subprocess.run([str(ns), "prepare_data", name], cwd=scratch,
                              env=ns_environment(ns)).returncode
    if not split.exists() or split.stat().st_size == 0:
        raise RuntimeError(f"ns prepare_data {name} exited {code} and wrote no {split}")
    with rundir.staged_directory(target) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return target / split.name


def cached_data(cache_dir: str | None, benchmarks: list[Benchmark]) -> Path | None:
    """<cache.dir>/nemo-skills when stage=cache_prepare put every benchmark's data there."""
    if not cache_dir:
        return None
    root = Path(cache_dir).expanduser().resolve() / DATA_DIR
    return root if all((root / b.name / "__init__.py").exists() for b in benchmarks) else None
