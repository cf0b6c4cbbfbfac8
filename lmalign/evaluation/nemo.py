"""eval=nemo: each checkpoint served (vLLM, SGLang, transformers serve, or a server you run) and
evaluated by NeMo-Skills' `ns eval` (lmalign.evaluation.nemo_skills), one resumable cell per
checkpoint with all of its benchmarks (docs/design.md, Evaluation backends)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmalign import processes, rundir, secrets
from lmalign.errors import JobFailed, UserError, problem
from lmalign.evaluation import cells, server
from lmalign.evaluation.cells import Target
from lmalign.evaluation.nemo_skills import (Benchmark, cached_data, catalog, eval_command,
                                            eval_help, is_judged, judge_key_variable,
                                            judge_problems, metric_rows, ns_environment,
                                            ns_executable, parse_benchmarks, read_benchmark)
from lmalign.schema import EvalConfig, HardwareConfig, JudgeConfig, ModelConfig

log = logging.getLogger(__name__)

DATA_LINK = "nemo-skills-data"  # in a cell's work directory: a link to the cached data


def settings(evaluation: EvalConfig) -> dict[str, Any]:
    """Everything that changes results; part of a cell's identity (the judge's key does not)."""
    spec = ",".join(b.spec for b in parse_benchmarks(str(evaluation.nemo.benchmark_spec)))
    found = {"backend": "nemo", "benchmarks": spec,
             "inference": dict(evaluation.nemo.inference or {}),
             "nemo_args": list(evaluation.nemo.nemo_args or [])}
    if is_judged(evaluation):
        judge = evaluation.nemo.judge
        found["judge"] = {"model": judge.model, "server_type": judge.server_type,
                          "server_address": judge.base_url}
        # only where set, so cells of a judge without them keep their identity
        found["judge"].update({key: value for key, value in (
            ("server", judge.server), ("extra", dict(judge.extra)),
            ("args", list(judge.args))) if value})
    return found


def requested_cells(targets: list[Target], evaluation: EvalConfig, run_dir: Path) -> list[Path]:
    return [cells.cell_dir(run_dir, target, settings(evaluation)) for target in targets]


def check(evaluation: EvalConfig, cache_dir: str | None = None) -> Path:
    """Before any training or server: NeMo-Skills is there, it knows every benchmark, their data
    is prepared (in NeMo-Skills' environment or the offline cache), their scoring can run here,
    and each judge's API key is in the environment. Every problem at once."""
    benchmarks = parse_benchmarks(str(evaluation.nemo.benchmark_spec))
    ns = ns_executable(evaluation.nemo.nemo_env)
    known = catalog(ns, tuple(dict.fromkeys(b.name for b in benchmarks)))
    cached = cached_data(cache_dir, benchmarks)
    problems = judge_problems(evaluation.nemo.judge)
    for name in dict.fromkeys(b.name for b in benchmarks):
        if name not in known.benchmarks:
            problems.append(problem("eval.nemo.benchmarks", name, "not a benchmark of the "
                                    f"NeMo-Skills in {ns.parent.parent}", ", ".join(known.known),
                                    "a name from that list "
                                    "(eval.nemo.benchmarks=[gsm8k:4,ifeval])"))
            continue
        info = known.benchmarks[name]
        data = known.root / name / f"{info['split']}.jsonl"
        if cached is None and not info["group"] and not data.exists():
            problems.append(problem(
                "eval.nemo.benchmarks", name, f"its data is not prepared ({data} is missing), "
                "so ns eval would fail after the server started", "prepared benchmarks",
                f"{ns} prepare_data {name}, or stage=cache_prepare cache.dir=<dir> with this "
                "run's settings and cache.dir=<dir> here"))
        if info.get("container") and not Path(info["container"]).exists():
            problems.append(problem(
                "eval.nemo.benchmarks", name, f"NeMo-Skills scores it with a tool only its "
                f"container has ({info['container']}); here it would generate every answer "
                "and never be scored", "benchmarks scored outside the container, or a run "
                "inside NeMo-Skills' container", f"drop {name}, or run inside the NeMo-Skills "
                "container"))
        default_judge = info["judge"]
        if not (default_judge or is_judged(evaluation)):
            continue
        variable = judge_key_variable(evaluation, default_judge)
        if variable and not os.environ.get(variable):
            who = (evaluation.nemo.judge.model or
                   (default_judge or {}).get("model", "its judge"))
            problems.append(problem(
                "eval.nemo.judge.api_key_env", variable, f"{name} is judged by {who}, whose API "
                f"key NeMo-Skills reads from ${variable}, which is not set", "the variable's name "
                "(the key itself is never written)", f"export {variable}=<key>, or "
                f"+secrets.{variable}=<key> (kept out of every saved file)"))
    if problems:
        raise UserError(problems)
    return ns


def evaluate(targets: list[Target], evaluation: EvalConfig, run_dir: Path, model: ModelConfig,
             hardware: HardwareConfig, cache_dir: str | None = None) -> None:
    """model: the run's model settings (dtype, for merging a LoRA adapter); cache_dir: the
    offline cache, whose prepared benchmark data is used when it has all of it."""
    ns = check(evaluation, cache_dir)
    env = ns_environment(ns)
    help_text = eval_help(ns, tuple(sorted(env.items())))
    benchmarks = parse_benchmarks(str(evaluation.nemo.benchmark_spec))
    data = cached_data(cache_dir, benchmarks)
    pending = []
    for target in targets:
        cell = cells.cell_dir(run_dir, target, settings(evaluation))
        if cells.is_complete(cell):
            log.info("eval %s: nemo cell done, skipping", target.label)
        else:
            pending.append((target, cell))
    if not pending:
        return
    judge = evaluation.nemo.judge
    if judge.server:
        # ns eval generates and judges in one call, so the judge's server runs beside each
        # checkpoint's
        log.info("eval.nemo.judge.server=%s: lmalign serves the judge %s for these cells%s",
                 judge.server, judge.model, "; on one GPU both servers share its memory"
                 if hardware.accelerator == "cuda" else "")
    with server.judge_endpoint(judge, Path(run_dir) / server.JUDGE_SERVER_DIR,
                               hardware) as judge_url:
        asked = replace(judge, base_url=judge_url, server_type="openai", api_key_env=None) \
            if judge.server else judge
        for target, cell in pending:
            _serve_and_evaluate(target, evaluation, asked, model, hardware, benchmarks, cell,
                                ns, env, help_text, data)


def _serve_and_evaluate(target: Target, evaluation: EvalConfig, judge: JudgeConfig,
                        model: ModelConfig, hardware: HardwareConfig,
                        benchmarks: list[Benchmark], cell: Path, ns: Path, env: dict[str, str],
                        help_text: str, data: Path | None) -> None:
    # NeMo-Skills' own output files stay in the work directory until every benchmark is
    # complete: a re-run continues there (ns eval skips what has its .done), then it becomes
    # the cell at once.
    work = cell.with_name(cell.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    server.end_left_behind(work)  # a run killed outright could not stop its server
    served = server.served_model(target, evaluation.nemo.server, model, hardware, work,
                                 "eval=harness evaluates this run's checkpoints")
    data_dir = None
    if data is not None:
        # Without a cluster, ns eval reads `./<data_dir's name>/<benchmark>/<split>.jsonl`
        # relative to where it runs: the cached data is linked into the work directory.
        data_dir = work / DATA_LINK
        if not data_dir.is_symlink():
            data_dir.symlink_to(data, target_is_directory=True)
    log.info("eval %s: NeMo-Skills %s -> %s", target.label, evaluation.nemo.benchmark_spec,
             work.relative_to(work.parent.parent.parent))
    variable = judge_key_variable(evaluation, None)  # named by the user, maybe not like a key
    keys = secrets.secret_values() + ([os.environ[variable]] if os.environ.get(variable or "")
                                      else [])
    try:
        with server.serving(served.launch, work / "server.log",
                            float(evaluation.nemo.server_startup_timeout_s),
                            evaluation.nemo.server_address) as running:
            argv = eval_command(ns, help_text, benchmarks, served.name, running.base_url, work,
                                f"lmalign-{target.label}", dict(evaluation.nemo.inference or {}),
                                list(evaluation.nemo.nemo_args), judge, data_dir)
            with open(work / "ns_eval.log", "a") as output, processes.owned_children():
                # NeMo-Skills' jobs hold connections to the server: on a stop they end first.
                output.write(f"$ {' '.join(argv)}\n")
                output.flush()
                code = subprocess.run(argv, cwd=work, env=env, stdout=output,
                                      stderr=subprocess.STDOUT).returncode
    finally:
        for written in (work / "ns_eval.log", work / "server.log"):
            _redact_file(written, keys)
    if served.merged:
        shutil.rmtree(served.merged)  # a copy of the weights; merged again if ever needed
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


def _redact_file(path: Path, values: list[str]) -> None:
    """A key that a tool printed never stays in the run directory."""
    if not values or not path.exists():
        return
    text = path.read_text(errors="replace")
    cleaned = secrets.redact(text, sorted(set(values), key=len, reverse=True))
    if cleaned != text:
        rundir.atomic_write_text(path, cleaned)
