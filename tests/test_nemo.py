"""NeMo-Skills results and command line, against real NeMo-Skills 0.7.0 output trees
(../shared/fixtures/nemo-skills, with the commands that made them in its SOURCE.md)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import lmalign, shared_path
from lmalign.errors import UserError
from lmalign.evaluation import nemo


def fixture(case: str):
    return shared_path("fixtures", "nemo-skills", case)


@pytest.mark.parametrize("case, spec", [("gsm8k_greedy", "gsm8k"), ("gsm8k_seeds2", "gsm8k:2")])
def test_rows_hold_what_metrics_json_holds_as_fractions(case, spec):
    (benchmark,) = nemo.parse_benchmarks(spec)
    outcome = nemo.read_benchmark(fixture(case), benchmark)
    assert outcome.complete and outcome.missing == []
    written = json.loads((fixture(case) / "eval-results" / "gsm8k" / "metrics.json").read_text())
    rows = nemo.metric_rows(outcome)
    expected = {(mode, name): value for mode, values in written["gsm8k"].items()
                for name, value in values.items() if name in ("symbolic_correct", "no_answer")}
    assert {(r["eval_mode"], r["metric"]): r["value"] * 100 for r in rows} == expected
    assert all(r["task"] == "gsm8k" and r["num_entries"] == 20 for r in rows)
    if benchmark.repeats:
        assert {r["eval_mode"] for r in rows} == {"pass@1", "pass@2", "majority@2",
                                                  "pass@1[avg-of-2]"}
        averaged = next(r for r in rows if r["eval_mode"] == "pass@1[avg-of-2]"
                        and r["metric"] == "symbolic_correct")
        assert averaged["stderr"] == 0.0  # its symbolic_correct_statistics.std_err_across_runs


def test_a_scoring_crash_is_incomplete_not_a_result():
    # ns eval exited 0 here: generation finished, evalplus crashed, no .done, no metrics.json.
    outcome = nemo.read_benchmark(fixture("human-eval_greedy_eval-failed"),
                                  nemo.Benchmark("human-eval", None))
    assert not outcome.complete and nemo.metric_rows(outcome) == []
    assert outcome.missing == ["output.jsonl.done", "metrics.json"]


def test_fewer_runs_than_asked_is_incomplete():
    outcome = nemo.read_benchmark(fixture("gsm8k_seeds2"), nemo.Benchmark("gsm8k", 3))
    assert not outcome.complete and outcome.missing == ["output-rs2.jsonl.done"]


def test_benchmark_syntax_is_nemo_skills_own():
    assert nemo.parse_benchmarks("gsm8k:4,ifeval") == [nemo.Benchmark("gsm8k", 4),
                                                       nemo.Benchmark("ifeval", None)]
    with pytest.raises(UserError, match=r"eval.benchmarks='gsm8k:x': cannot read 'gsm8k:x'.*"
                       r"fix: eval.benchmarks=gsm8k:4,ifeval"):
        nemo.parse_benchmarks("gsm8k:x")


def test_command_uses_the_flags_of_the_recorded_commands_and_typer_027_spelling(tmp_path):
    source = shared_path("fixtures", "nemo-skills", "SOURCE.md").read_text()
    recorded = set(re.findall(r"(--[a-z_]+)=", source))
    args = (nemo.parse_benchmarks("gsm8k:2"), "/models/m", "http://127.0.0.1:8765/v1",
            tmp_path / "out", "gsm8k-seeds2", {"tokens_to_generate": 32, "temperature": 0.7},
            ["++max_samples=20"])
    old = nemo.eval_command(tmp_path / "ns", "--output_dir --server_type", *args)
    assert old[1] == "eval" and "--benchmarks=gsm8k:2" in old and "++max_samples=20" in old
    assert "++inference.tokens_to_generate=32" in old and "--server_type=openai" in old
    assert {a.split("=")[0] for a in old if a.startswith("--")} <= recorded
    new = nemo.eval_command(tmp_path / "ns", "--output-dir --server-type", *args)
    assert f"--output-dir={tmp_path / 'out'}" in new and "--server-type=openai" in new


def test_missing_nemo_skills_is_one_line_saying_how_to_install(tmp_path):
    with pytest.raises(UserError, match=r"eval.nemo_env=None: eval=nemo needs NeMo-Skills' own "
                       r"environment.*fix: python -m venv .*pip install git\+https://github.com/"
                       r"NVIDIA-NeMo/Skills.git.*eval.nemo_env="):
        nemo.ns_executable(None)
    with pytest.raises(UserError, match=r"NeMo-Skills is not installed there"):
        nemo.ns_executable(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# End to end: `python -m lmalign ... eval=nemo` with a real transformers server on the tiny model
# and the stand-in `ns` (tests/nemo_stand_in) replaying the real output trees.

STAND_IN = Path(__file__).resolve().parent / "nemo_stand_in"
NEMO = ("stage=eval", "run_name=sft", "eval=nemo", "eval.server=transformers",
        "eval.checkpoints=[final]", f"eval.nemo_env={STAND_IN}")


@pytest.fixture
def trained(default_run, tmp_path):
    shutil.copytree(default_run[1], tmp_path / "runs" / "sft")
    return tmp_path / "runs" / "sft"


def _stand_in_env(tmp_path) -> dict[str, str]:
    return {"LMALIGN_NS_FIXTURES": str(fixture(".")), "LMALIGN_NS_CALLS": str(tmp_path / "calls")}


def test_eval_without_nemo_skills_exits_2_with_the_install_line(tmp_path, lmalign_cache):
    result = lmalign("stage=eval", "eval=nemo", "eval.server=transformers",
                     "eval.benchmarks=gsm8k", cwd=tmp_path, cache=lmalign_cache,
                     env={"LMALIGN_NEMO_ENV": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: eval.nemo_env=") and "pip install git+https://github.com/" \
        "NVIDIA-NeMo/Skills.git" in line


@pytest.mark.slow
def test_nemo_cells_land_in_metrics_csv_and_a_rerun_skips_them(trained, tmp_path, lmalign_cache):
    env = _stand_in_env(tmp_path)
    first = lmalign(*NEMO, "eval.benchmarks=gsm8k:2", cwd=tmp_path, cache=lmalign_cache, env=env,
                    timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(trained / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["backend"] == "nemo"]
    assert {(r["checkpoint"], r["task"], r["eval_mode"], r["metric"], r["value"]) for r in rows
            if r["eval_mode"] == "pass@1[avg-of-2]"} == {
        ("final", "gsm8k", "pass@1[avg-of-2]", "symbolic_correct", "0.0"),
        ("final", "gsm8k", "pass@1[avg-of-2]", "no_answer", "1.0")}
    (cell,) = [p for p in (trained / "eval" / "final").iterdir() if p.name.startswith("nemo-")]
    assert (cell / "eval-results" / "gsm8k" / "output-rs1.jsonl.done").exists()
    server_log = (cell / "server.log").read_text()
    assert "transformers serve" in server_log and "POST /v1/chat/completions" in server_log
    call = (tmp_path / "calls").read_text()
    assert "--benchmarks=gsm8k:2" in call and "++inference.temperature=0.6" in call
    second = lmalign(*NEMO, "eval.benchmarks=gsm8k:2", cwd=tmp_path, cache=lmalign_cache,
                     env=env, timeout=300)
    assert second.returncode == 0 and "nemo cell done, skipping" in second.stdout + second.stderr
    assert (tmp_path / "calls").read_text() == call  # no server, no ns: the cell was done


@pytest.mark.slow
def test_a_benchmark_ns_left_incomplete_fails_the_job_and_writes_no_cell(trained, tmp_path,
                                                                         lmalign_cache):
    result = lmalign(*NEMO, "eval.benchmarks=human-eval", cwd=tmp_path, cache=lmalign_cache,
                     env=_stand_in_env(tmp_path), timeout=300)
    assert result.returncode == 1
    assert "error: eval final: NeMo-Skills did not complete human-eval (missing " \
        "output.jsonl.done, metrics.json; ns eval exited 0)" in result.stderr
    assert not [p for p in (trained / "eval" / "final").glob("nemo-*")
                if not p.name.endswith(".partial")]
