"""NeMo-Skills results and command line, against real NeMo-Skills 0.7.0 output trees
(../shared/fixtures/nemo-skills, with the commands that made them in its SOURCE.md)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import (REPO, command_line, guarded, lmalign, marked_processes, shared_path,
                      typed_config)
from lmalign.errors import JobFailed, UserError
from lmalign.evaluation import nemo, nemo_skills, server
from lmalign.evaluation.cells import Target

STAND_IN = Path(__file__).resolve().parent / "nemo_stand_in"


def fixture(case: str):
    return shared_path("fixtures", "nemo-skills", case)


@pytest.mark.parametrize("case, spec", [("gsm8k_greedy", "gsm8k"), ("gsm8k_seeds2", "gsm8k:2")])
def test_rows_hold_what_metrics_json_holds_as_fractions(case, spec):
    (benchmark,) = nemo_skills.parse_benchmarks(spec)
    outcome = nemo_skills.read_benchmark(fixture(case), benchmark)
    assert outcome.complete and outcome.missing == []
    written = json.loads((fixture(case) / "eval-results" / "gsm8k" / "metrics.json").read_text())
    rows = nemo_skills.metric_rows(outcome)
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
    outcome = nemo_skills.read_benchmark(fixture("human-eval_greedy_eval-failed"),
                                  nemo_skills.Benchmark("human-eval", None))
    assert not outcome.complete and nemo_skills.metric_rows(outcome) == []
    assert outcome.missing == ["output.jsonl.done", "metrics.json"]


def test_fewer_runs_than_asked_is_incomplete():
    outcome = nemo_skills.read_benchmark(fixture("gsm8k_seeds2"), nemo_skills.Benchmark("gsm8k", 3))
    assert not outcome.complete and outcome.missing == ["output-rs2.jsonl.done"]


def test_benchmark_syntax_is_nemo_skills_own():
    assert nemo_skills.parse_benchmarks("gsm8k:4,ifeval") == [nemo_skills.Benchmark("gsm8k", 4),
                                                       nemo_skills.Benchmark("ifeval", None)]
    with pytest.raises(UserError, match=r"eval.nemo.benchmarks='gsm8k:x': cannot read 'gsm8k:x'.*"
                       r"fix: eval.nemo.benchmarks=\[gsm8k:4,ifeval\]"):
        nemo_skills.parse_benchmarks("gsm8k:x")
    # On the command line a list (a bare comma would be a sweep); both forms are one cell.
    as_list = _nemo_config("eval.nemo.benchmarks=[gsm8k:4,ifeval]").eval
    as_string = _nemo_config("eval.nemo.benchmarks='gsm8k:4, ifeval'").eval
    assert as_list.nemo.benchmark_spec == "gsm8k:4,ifeval"
    assert nemo.settings(as_list) == nemo.settings(as_string)


def test_command_uses_the_flags_of_the_recorded_commands_and_typer_027_spelling(tmp_path):
    source = shared_path("fixtures", "nemo-skills", "SOURCE.md").read_text()
    recorded = set(re.findall(r"(--[a-z_]+)=", source))
    args = (nemo_skills.parse_benchmarks("gsm8k:2"), "/models/m", "http://127.0.0.1:8765/v1",
            tmp_path / "out", "gsm8k-seeds2", {"tokens_to_generate": 32, "temperature": 0.7},
            ["++max_samples=20"])
    old = nemo_skills.eval_command(tmp_path / "ns", "--output_dir --server_type", *args)
    assert old[1] == "eval" and "--benchmarks=gsm8k:2" in old and "++max_samples=20" in old
    assert "++inference.tokens_to_generate=32" in old and "--server_type=openai" in old
    assert {a.split("=")[0] for a in old if a.startswith("--")} <= recorded
    new = nemo_skills.eval_command(tmp_path / "ns", "--output-dir --server-type", *args)
    assert f"--output-dir={tmp_path / 'out'}" in new and "--server-type=openai" in new


def test_missing_nemo_skills_is_one_line_saying_how_to_install(tmp_path):
    with pytest.raises(UserError, match=r"eval.nemo.nemo_env=None: eval=nemo needs NeMo-Skills' own "
                       r"environment.*fix: python -m venv .*pip install git\+https://github.com/"
                       r"NVIDIA-NeMo/Skills.git.*eval.nemo.nemo_env="):
        nemo_skills.ns_executable(None)
    with pytest.raises(UserError, match=r"NeMo-Skills is not installed there"):
        nemo_skills.ns_executable(str(tmp_path))


def test_the_judge_block_maps_onto_ns_judge_flags_naming_the_key_variable_never_the_key(
        tmp_path):
    judge = typed_config("eval=nemo", "eval.nemo.judge.model=gpt-4.1",
                         "eval.nemo.judge.base_url=https://api.openai.com/v1",
                         "eval.nemo.judge.api_key_env=TEAM_JUDGE_KEY",
                         "eval.nemo.judge.server_type=openai").eval.nemo.judge
    argv = nemo_skills.eval_command(tmp_path / "ns", "--judge_model", nemo_skills.parse_benchmarks("arena-hard"),
                             "/models/m", "http://127.0.0.1:8765/v1", tmp_path / "out", "x", {},
                             [], judge)
    assert {"--judge_model=gpt-4.1", "--judge_server_type=openai",
            "--judge_server_address=https://api.openai.com/v1",
            "--extra_judge_args=++server.api_key_env_var=TEAM_JUDGE_KEY"} <= set(argv)
    tuned = replace(judge, concurrency=8, request_timeout_s=90,
                    extra={"reasoning_effort": "low", "top_k": 1},
                    args=["++prompt_config=judge/math"])
    assert nemo_skills.judge_generation_args(tuned) == [
        "++server.api_key_env_var=TEAM_JUDGE_KEY", "++max_concurrent_requests=8",
        "++inference.timeout=90", "++inference.extra_body.reasoning_effort=low",
        "++inference.extra_body.top_k=1", "++prompt_config=judge/math"]
    # what changes the judgments is part of the cell's identity, only where it is set
    config = typed_config("eval=nemo", "eval.nemo.judge.model=gpt-4.1").eval
    assert "extra" not in nemo.settings(config)["judge"]
    config.nemo.judge = tuned
    assert nemo.settings(config)["judge"]["args"] == ["++prompt_config=judge/math"]


def test_a_nemo_judge_that_cannot_work_is_refused_before_anything_runs():
    with pytest.raises(UserError) as refused:
        nemo.check(_nemo_config("eval.nemo.judge.server=vllm",
                                "+eval.nemo.judge.extra.stop='[a b]'",
                                "+eval.nemo.judge.extra.effort='very low'",
                                "eval.nemo.judge.args=['prompt_config=judge/math']").eval)
    assert len(refused.value.problems) == 4, refused.value.problems
    assert refused.value.problems[0].startswith(
        "eval.nemo.judge.model=None: eval.nemo.judge.server=vllm serves the judge model")
    assert all("ns eval takes its judge's arguments as one string split at spaces" in line
               for line in refused.value.problems[1:3])
    assert refused.value.problems[3].startswith("eval.nemo.judge.args='prompt_config=judge/math'")


def _nemo_config(*overrides: str):
    return typed_config("stage=eval", "eval=nemo", "eval.nemo.server=transformers",
                        f"eval.nemo.nemo_env={STAND_IN}", *overrides)


def test_an_unknown_benchmark_is_refused_with_the_ones_nemo_skills_has():
    with pytest.raises(UserError, match=r"eval.nemo.benchmarks='gsm9k': not a benchmark of the "
                       r"NeMo-Skills in .*nemo_stand_in; allowed: arena-hard, gsm8k, human-eval, ifeval"):
        nemo.check(_nemo_config("eval.nemo.benchmarks=[gsm9k,gsm8k]").eval)


def test_a_judged_benchmark_without_its_api_key_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match=r"eval.nemo.judge.api_key_env='OPENAI_API_KEY': arena-hard "
                       r"is judged by gpt-4.1, whose API key NeMo-Skills reads from "
                       r"\$OPENAI_API_KEY, which is not set.*fix: export OPENAI_API_KEY=<key>, "
                       r"or \+secrets.OPENAI_API_KEY=<key>"):
        nemo.check(_nemo_config("eval.nemo.benchmarks=arena-hard").eval)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    nemo.check(_nemo_config("eval.nemo.benchmarks=arena-hard").eval)
    with pytest.raises(UserError, match=r"eval.nemo.judge.api_key_env='TEAM_JUDGE_KEY': gsm8k is "
                       r"judged by my-judge"):  # any benchmark is judged once a judge is set
        nemo.check(_nemo_config("eval.nemo.benchmarks=gsm8k", "eval.nemo.judge.model=my-judge",
                                "eval.nemo.judge.api_key_env=TEAM_JUDGE_KEY").eval)


def test_a_benchmark_without_prepared_data_is_refused_before_any_server_starts(tmp_path):
    nemo_env = tmp_path / "nemo-env"
    shutil.copytree(STAND_IN, nemo_env)
    (nemo_env / "lib" / "nemo_skills" / "dataset" / "gsm8k" / "test.jsonl").unlink()
    with pytest.raises(UserError, match=r"eval.nemo.benchmarks='gsm8k': its data is not prepared "
                       r"\(.*gsm8k/test.jsonl is missing\), so ns eval would fail after the "
                       r"server started; .*fix: .*/ns prepare_data gsm8k, or stage=cache_prepare"):
        nemo.check(typed_config("stage=eval", "eval=nemo", "eval.nemo.server=transformers",
                                f"eval.nemo.nemo_env={nemo_env}",
                                "eval.nemo.benchmarks=[gsm8k]").eval)


def test_a_benchmark_scored_only_in_nemo_skills_container_is_refused_before_any_work():
    with pytest.raises(UserError, match=r"eval.nemo.benchmarks='ifeval': NeMo-Skills scores it "
                       r"with a tool only its container has \(/opt/benchmarks/google-research\)"):
        nemo.check(_nemo_config("eval.nemo.benchmarks=[gsm8k,ifeval]").eval)


@pytest.mark.parametrize("typer, spelling", [("0.26", "--server_address"),
                                             ("0.27", "--server-address")])
def test_the_help_is_read_whole_however_narrow_the_terminal(tmp_path, monkeypatch, typer,
                                                            spelling):
    """typer draws `ns eval --help` with rich at 80 columns, cutting long option names."""
    for name, value in _stand_in_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LMALIGN_NS_TYPER", typer)
    monkeypatch.setenv("COLUMNS", "80")
    ns = STAND_IN / "bin" / "ns"
    help_text = nemo_skills.eval_help(ns, tuple(sorted(nemo_skills.ns_environment(ns).items())))
    assert nemo_skills.flag_spelling(help_text, "server_address") == spelling
    assert nemo_skills.flag_spelling(help_text, "judge_server_address") == spelling.replace(
        "--", "--judge" + spelling[8])


# ---------------------------------------------------------------------------------------------
# Serving what training wrote: a LoRA adapter the way each server takes it.


@pytest.fixture(scope="module")
def lora_adapter(lmalign_cache, tmp_path_factory):
    """A LoRA adapter on the embedded tiny model, with nonzero weights (merging changes it)."""
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmalign import embedded

    tiny = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    final = embedded.materialize("tiny", OmegaConf.to_container(tiny.architecture), 0,
                                 lmalign_cache)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(final), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path_factory.mktemp("lora") / "checkpoint-5"
    model.save_pretrained(adapter)
    shutil.copy(final / "tokenizer.json", adapter)
    shutil.copy(final / "tokenizer_config.json", adapter)
    return adapter, model


def test_a_lora_adapter_is_served_by_vllm_and_sglang_as_an_adapter(lora_adapter, tmp_path):
    adapter, _ = lora_adapter
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = _nemo_config()
    target = Target("checkpoint-5", 5, str(adapter))
    vllm = server.served_model(target, "vllm", config.model, config.hardware, tmp_path, "")
    assert vllm.name == "lmalign-checkpoint-5" and vllm.launch.model == base
    assert vllm.launch.extra_args == ("--enable-lora", "--lora-modules",
                                      f"lmalign-checkpoint-5={adapter}", "--max-lora-rank", "8")
    sglang = server.served_model(target, "sglang", config.model, config.hardware, tmp_path, "")
    assert sglang.launch.extra_args == ("--lora-paths", f"lmalign-checkpoint-5={adapter}")
    assert not list(tmp_path.iterdir())  # nothing merged for servers that take adapters


def test_a_lora_adapter_is_merged_for_transformers_serve(lora_adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    adapter, peft_model = lora_adapter
    config = _nemo_config()
    served = server.served_model(Target("checkpoint-5", 5, str(adapter)), "transformers",
                                 config.model, config.hardware, tmp_path, "")
    assert served.merged == tmp_path / "merged-model" and served.launch.model == served.name
    merged = AutoModelForCausalLM.from_pretrained(served.merged)
    tokens = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        expected = peft_model(tokens).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            unadapted = base(tokens).logits
        assert torch.allclose(merged(tokens).logits, expected, atol=1e-5)
    assert not torch.allclose(expected, unadapted, atol=1e-3)


def test_a_hub_revision_is_served_from_its_snapshot_in_the_hub_cache(tmp_path):
    from hub_server import HubServer, write_tiny_model_repo

    write_tiny_model_repo(tmp_path / "hub" / "models" / "lmalign-test" / "tiny")
    script = (  # huggingface_hub reads HF_ENDPOINT when imported: a process of its own
        "import sys; sys.path.insert(0, sys.argv[1]); from conftest import typed_config\n"
        "from lmalign.evaluation import server; from lmalign.evaluation.cells import Target\n"
        "config = typed_config('stage=eval', 'eval=nemo', 'eval.nemo.server=vllm')\n"
        "served = server.served_model(Target('main', None, 'lmalign-test/tiny', 'main'), "
        "'vllm', config.model, config.hardware, None, '')\n"
        "print(served.launch.model, served.name)")
    with HubServer(tmp_path / "hub") as hub:
        result = subprocess.run(
            [sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True,
            text=True, timeout=120, env={**os.environ, "HF_ENDPOINT": hub.url,
                                         "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    model, name = result.stdout.split()
    assert model == name and Path(model).parent.parent.name == "models--lmalign-test--tiny"
    assert (Path(model) / "config.json").exists() and (Path(model) / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# End to end: `python -m lmalign ... eval=nemo` with a real transformers server on the tiny model
# and the stand-in `ns` (tests/nemo_stand_in) replaying the real output trees.

NEMO = ("stage=eval", "run_name=sft", "eval=nemo", "eval.nemo.server=transformers",
        "eval.checkpoints=[final]", f"eval.nemo.nemo_env={STAND_IN}")


@pytest.fixture
def trained(default_run, tmp_path):
    shutil.copytree(default_run[1], tmp_path / "runs" / "sft")
    return tmp_path / "runs" / "sft"


def _stand_in_env(tmp_path) -> dict[str, str]:
    return {"LMALIGN_NS_FIXTURES": str(fixture(".")), "LMALIGN_NS_CALLS": str(tmp_path / "calls")}


def test_eval_without_nemo_skills_exits_2_with_the_install_line(tmp_path, lmalign_cache):
    result = lmalign("stage=eval", "eval.checkpoints=[base]", "eval=nemo",
                     "eval.nemo.server=transformers", "eval.nemo.benchmarks=gsm8k", cwd=tmp_path,
                     cache=lmalign_cache, env={"LMALIGN_NEMO_ENV": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: eval.nemo.nemo_env=") and "pip install git+https://github.com/" \
        "NVIDIA-NeMo/Skills.git" in line


def test_a_failed_prepare_never_passes_for_done_on_an_older_copy(tmp_path, monkeypatch):
    nemo_env = tmp_path / "nemo-env"  # ns prepare_data writes into its environment: a copy
    shutil.copytree(STAND_IN, nemo_env)
    for name, value in _stand_in_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    ns = nemo_skills.ns_executable(str(nemo_env))
    assert nemo_skills.prepare_data(ns, "gsm8k", tmp_path / "first").stat().st_size > 0
    monkeypatch.setenv("LMALIGN_NS_PREPARE_FAILS", "1")
    with pytest.raises(RuntimeError, match="ns prepare_data gsm8k exited 1 and wrote no "):
        nemo_skills.prepare_data(ns, "gsm8k", tmp_path / "second")
    assert not (tmp_path / "second").exists()


@pytest.mark.slow
def test_offline_from_prepared_benchmark_data_cells_land_in_metrics_csv_and_a_rerun_skips_them(
        trained, tmp_path, lmalign_cache, monkeypatch):
    from lmalign.cache import fetch, plan

    nemo_env = tmp_path / "nemo-env"  # ns prepare_data writes into its environment: a copy
    shutil.copytree(STAND_IN, nemo_env)
    env, lmalign_dir = _stand_in_env(tmp_path), tmp_path / "lmalign-cache"
    request = (*NEMO, "eval.nemo.benchmarks=gsm8k:2", f"eval.nemo.nemo_env={nemo_env}",
               f"cache.dir={lmalign_dir}")
    for name, value in env.items():  # plan and prepare run here; the evaluations as a user's
        monkeypatch.setenv(name, value)
    planned = plan.plan(typed_config(*request, "stage=cache_plan"))
    assert re.search(r"nemo-benchmark\s+gsm8k\s+-\s+eval=nemo",
                     plan.describe(planned, None))
    fetch.prepare(typed_config(*request, "stage=cache_prepare"), lmalign_dir)
    (item,) = json.loads((lmalign_dir / "manifest.json").read_text())["items"]
    assert (item["kind"], item["repo"], item["status"], item["rows"]) == (
        "nemo-benchmark", "gsm8k", "done", {"test.jsonl": 1319})
    fetch.verify(lmalign_dir)  # every file, and its rows

    log = tmp_path / "network.log"
    first = lmalign(*request, "offline=true", cwd=tmp_path, cache=lmalign_cache,
                    env={**env, **guarded(log)}, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not log.exists(), log.read_text()
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
    assert f"read {lmalign_dir / 'nemo-skills' / 'gsm8k' / 'test.jsonl'}" in call  # the cache's
    second = lmalign(*request, "offline=true", cwd=tmp_path, cache=lmalign_cache, env=env,
                     timeout=300)
    assert second.returncode == 0 and "nemo cell done, skipping" in second.stdout + second.stderr
    assert (tmp_path / "calls").read_text() == call  # no server, no ns: the cell was done

    data = lmalign_dir / "nemo-skills" / "gsm8k" / "test.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:100]))
    with pytest.raises(JobFailed, match=r"nemo-benchmark gsm8k: file of the wrong size "
                       r"nemo-skills/gsm8k/test.jsonl"):
        fetch.verify(lmalign_dir)


def test_harness_and_nemo_compose_in_one_job_each_under_its_own_key():
    config = typed_config("eval=[harness,nemo]", "eval.harness.tasks=[tiny_mc]",
                          "eval.nemo.benchmarks=[gsm8k]", "eval.nemo.server=transformers")
    assert config.eval.backends == ["harness", "nemo"] and config.evaluates
    assert config.eval.harness.tasks == ["tiny_mc"] and config.eval.nemo.benchmark_spec == "gsm8k"
    assert typed_config("eval=none").eval.backends == [] and not typed_config("eval=none").evaluates
    assert typed_config("eval=nemo").eval.harness is None  # no keys of the other backend


@pytest.mark.slow
def test_harness_and_nemo_in_one_job_write_both_backends_cells_into_one_metrics_csv(
        trained, tmp_path, lmalign_cache):
    """NeMo-Skills' judge here is one lmalign serves (the tiny model: ns's stand-in asks it once)."""
    result = lmalign("stage=eval", "run_name=sft", "eval=[harness,nemo]",
                     "eval.harness.tasks=[tiny_mc]", "eval.harness.limit=20",
                     "eval.nemo.benchmarks=[gsm8k]", "eval.nemo.server=transformers",
                     f"eval.nemo.nemo_env={STAND_IN}", "eval.checkpoints=[final]",
                     "eval.nemo.judge.server=transformers", "eval.nemo.judge.concurrency=4",
                     f"eval.nemo.judge.model={trained / 'final'}", cwd=tmp_path,
                     cache=lmalign_cache, timeout=300,
                     env={**_stand_in_env(tmp_path), "LMALIGN_TEST_MARK": "nemo-judge"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (call,) = [c for c in (tmp_path / "calls").read_text().splitlines() if c.startswith("eval ")]
    assert re.search(r"--judge_server_address=http://127\.0\.0\.1:\d+/v1", call)
    assert f"--judge_model={trained / 'final'}" in call and "--judge_server_type=openai" in call
    assert "--extra_judge_args=++max_concurrent_requests=4" in call
    assert "judge answered: assistant" in next(trained.glob("eval/final/nemo-*/ns_eval.log")) \
        .read_text()
    assert "serve" in (trained / "judge-server" / "server.log").read_text()
    assert not marked_processes("nemo-judge")  # both servers were stopped
    final = sorted(p.name.split("-")[0] for p in (trained / "eval" / "final").iterdir())
    assert final == ["harness", "harness", "nemo"]  # the training's cell, this limit's, nemo's
    with open(trained / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["backend"] for r in rows if r["checkpoint"] == "final"} == {"harness", "nemo"}
    assert {r["task"] for r in rows if r["backend"] == "nemo"} == {"gsm8k"}
    record = json.loads((trained / "run.json").read_text())
    assert record["attempts"][-1]["status"] == "done" and record["status"] == "done"
    # The run's summary and results.zip hold NeMo-Skills' own results, titled as values.
    lmalign("stage=report", "run_name=sft", "report.pack=true", cwd=tmp_path,
            cache=lmalign_cache, check=True)
    summary = (trained / "summary.md").read_text()
    assert "None-shot" not in summary and "| value |" in summary
    with zipfile.ZipFile(trained / "results.zip") as packed:
        names = packed.namelist()
    assert any(n.endswith("eval-results/gsm8k/metrics.json") for n in names), names


@pytest.mark.slow
def test_a_benchmark_ns_left_incomplete_fails_the_job_and_writes_no_cell(trained, tmp_path,
                                                                         lmalign_cache):
    result = lmalign(*NEMO, "eval.nemo.benchmarks=human-eval", cwd=tmp_path, cache=lmalign_cache,
                     env=_stand_in_env(tmp_path), timeout=300)
    assert result.returncode == 1
    assert "error: eval final: NeMo-Skills did not complete human-eval (missing " \
        "output.jsonl.done, metrics.json; ns eval exited 0)" in result.stderr
    assert not [p for p in (trained / "eval" / "final").glob("nemo-*")
                if not p.name.endswith(".partial")]


SECRET = "judge-key-5f3a9c1e7b"
JUDGED = ("eval=nemo", "eval.nemo.server=transformers", "eval.nemo.benchmarks=gsm8k",
          f"eval.nemo.nemo_env={STAND_IN}", "eval.nemo.judge.model=judge-7b",
          "eval.nemo.judge.server_type=openai",
          "eval.nemo.judge.base_url=http://judge-host.invalid/v1",
          "eval.nemo.judge.api_key_env=LMALIGN_TEST_JUDGE_KEY")


@pytest.mark.slow
def test_a_checkpoint_sweep_and_the_watcher_share_nemo_cells_and_never_write_the_judge_key(
        ddp_run, tmp_path, lmalign_cache):
    run = tmp_path / "runs" / "ddp_sft"  # checkpoints 20, 40 (60 left out) and final/
    shutil.copytree(ddp_run[1], run, ignore=shutil.ignore_patterns("checkpoint-60"))
    env = {**_stand_in_env(tmp_path), "LMALIGN_TEST_JUDGE_KEY": SECRET}
    sweep = lmalign("-m", "stage=eval", "run_name=ddp_sft", *JUDGED, "eval.checkpoints=20,final",
                    "hydra.sweep.dir=sweep", cwd=tmp_path, cache=lmalign_cache, env=env,
                    timeout=300)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    with open(tmp_path / "sweep" / "summary.csv") as handle:
        swept = {(r["checkpoint"], r["metric"]) for r in csv.DictReader(handle)
                 if r["eval_mode"] == "pass@1"}
    assert swept == {(c, m) for c in ("checkpoint-20", "final")
                     for m in ("symbolic_correct", "no_answer")}

    watcher = lmalign("stage=watch", "run_name=ddp_sft", *JUDGED, "watch.poll_seconds=0.5",
                      cwd=tmp_path, cache=lmalign_cache, env=env, timeout=300)
    assert watcher.returncode == 0, watcher.stderr[-3000:]
    assert "every checkpoint is evaluated" in watcher.stdout + watcher.stderr
    calls = [line for line in (tmp_path / "calls").read_text().splitlines()
             if line.startswith("eval ")]
    assert len(calls) == 3 and "checkpoint-40" in calls[2]  # the sweep's cells were reused
    assert all("--judge_model=judge-7b" in c and
               "--extra_judge_args=++server.api_key_env_var=LMALIGN_TEST_JUDGE_KEY" in c
               for c in calls)
    with open(run / "metrics.csv") as handle:
        assert {r["checkpoint"] for r in csv.DictReader(handle) if r["backend"] == "nemo"} == {
            "checkpoint-20", "checkpoint-40", "final"}

    # ns printed the key it was given (a tool that logs its environment): the log keeps ***.
    logs = list(run.glob("eval/*/nemo-*/ns_eval.log"))
    assert len(logs) == 3 and all("from $LMALIGN_TEST_JUDGE_KEY: ***" in log.read_text()
                                  for log in logs)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert SECRET not in sweep.stdout + sweep.stderr + watcher.stdout + watcher.stderr


def _stop_case(tmp_path: Path, cache: Path, **stand_in: str):
    """(marker, command, environment) of an eval=nemo run on the stand-in, to be stopped: every
    process it starts carries the marker in its environment."""
    import uuid

    marker = f"lmalign-test-{uuid.uuid4().hex}"
    args = [sys.executable, "-m", "lmalign", "stage=eval", "run_name=sft", "eval=nemo",
            "eval.nemo.benchmarks=[gsm8k]", "eval.nemo.server=transformers",
            f"eval.nemo.nemo_env={STAND_IN}", "eval.checkpoints=[final]"]
    return marker, args, {**os.environ, "LMALIGN_CACHE": str(cache), **_stand_in_env(tmp_path),
                          **stand_in, "LMALIGN_TEST_MARK": marker}


@pytest.mark.slow
def test_sigterm_while_generating_ends_the_server_and_nemo_skills_own_jobs(trained, tmp_path,
                                                                           lmalign_cache):
    """NeMo-Skills' generation runs in a session of its own (nemo_run): SIGTERM to lmalign ends
    it and the server too, exits 143, and the re-run completes the cell."""
    import signal
    import socket
    import time

    marker, args, env = _stop_case(tmp_path, lmalign_cache, LMALIGN_NS_JOB_SECONDS="600")
    with open(tmp_path / "stopped.log", "wb") as output:
        process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not list((trained / "eval" / "final").glob("*.partial/generation-job.pid")):
        assert process.poll() is None and time.time() < deadline, \
            (tmp_path / "stopped.log").read_text()[-3000:]
        time.sleep(0.2)
    (server_log,) = (trained / "eval" / "final").glob("*.partial/server.log")
    port = int(re.search(r"--port (\d+)", server_log.read_text()).group(1))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    output = (tmp_path / "stopped.log").read_text()
    assert "Traceback" not in output and "stopped: SIGTERM" in output
    assert marked_processes(marker) == []  # the server, ns and its own-session job: all gone
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert list((trained / "eval" / "final").glob("nemo-*.partial"))  # kept for the re-run

    # SIGKILL leaves no chance to stop anything: the re-run ends the server it recorded.
    with open(tmp_path / "killed.log", "wb") as output:
        process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    pid_files = list((trained / "eval" / "final").glob("*.partial/generation-job.pid"))
    for stale in pid_files:
        stale.unlink()
    while not list((trained / "eval" / "final").glob("*.partial/generation-job.pid")):
        assert process.poll() is None and time.time() < deadline + 300
        time.sleep(0.2)
    (record,) = (trained / "eval" / "final").glob("*.partial/server.json")
    server = json.loads(record.read_text())["pid"]
    process.kill()
    process.wait()
    assert Path(f"/proc/{server}").exists()  # left running by the killed run
    env.pop("LMALIGN_NS_JOB_SECONDS")
    env["LMALIGN_TEST_MARK"] = marker + "-rerun"
    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "ending the server an earlier, stopped run left running" in rerun.stdout
    assert not Path(f"/proc/{server}").exists() or "zombie" in Path(
        f"/proc/{server}/status").read_text()
    assert [p for p in (trained / "eval" / "final").glob("nemo-*") if (p / "cell.json").exists()]
    for pid in marked_processes(marker):  # the killed run's own-session job, which nothing recorded
        os.kill(pid, signal.SIGKILL)


def _start_stoppable(args: list[str], env: dict[str, str], cwd: Path,
                     log: Path) -> subprocess.Popen:
    """As from a terminal: background shells (CI's too) start jobs with SIGINT ignored."""
    import signal

    def default_signals() -> None:
        for number in (signal.SIGINT, signal.SIGUSR1):
            signal.signal(number, signal.SIG_DFL)

    with open(log, "wb") as output:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                preexec_fn=default_signals)


def _await_file(process: subprocess.Popen, folder: Path, pattern: str, log: Path) -> Path:
    import time

    deadline = time.time() + 300
    while not list(folder.glob(pattern)):
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return next(folder.glob(pattern))


@pytest.mark.slow
def test_each_signal_while_the_server_starts_and_while_scoring_ends_everything_then_resume(
        trained, tmp_path, lmalign_cache):
    """Ctrl-C before the server answers, SLURM's SIGUSR1 while NeMo-Skills scores (in a job of
    its own session): each run ends every process it started within the bound, closes the
    server's port, keeps the cell .partial, and the next run completes it. (SIGTERM while
    generating: the test above; every stop signal takes the same path, processes.owned.)"""
    import signal
    import socket

    marker, args, env = _stop_case(tmp_path, lmalign_cache, LMALIGN_NS_SCORE_SECONDS="600")
    cells = trained / "eval" / "final"
    stops = [("server.json", signal.SIGINT, "interrupted"),
             ("scoring-job.pid", signal.SIGUSR1, "SIGUSR1")]
    for when, number, said in stops:
        for stale in cells.glob("*.partial/scoring-job.pid"):
            stale.unlink()
        log = tmp_path / f"{when}-{number}.log"
        process = _start_stoppable(args, env, tmp_path, log)
        _await_file(process, cells, f"*.partial/{when}", log)
        if when == "server.json":
            assert "server answers" not in log.read_text()  # still loading the model
        process.send_signal(number)
        assert process.wait(timeout=60) == 128 + number, (when, number)
        output = log.read_text()
        assert "Traceback" not in output and f"stopped: {said}" in output, output[-3000:]
        assert marked_processes(marker) == [], (when, number)
        (server_log,) = cells.glob("*.partial/server.log")
        for port in re.findall(r"--port (\d+)", server_log.read_text()):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
        assert not list(cells.glob("*.partial/server.json"))  # stopped, not left for a re-run

    env.pop("LMALIGN_NS_SCORE_SECONDS")
    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [p for p in cells.glob("nemo-*") if (p / "cell.json").exists()]
    assert marked_processes(marker) == []


REAL_NEMO_ENV = os.environ.get("LMALIGN_NEMO_ENV")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_NEMO_ENV, reason=(
    "opt-in: set LMALIGN_NEMO_ENV to a real NeMo-Skills 0.7.0 environment with gsm8k prepared "
    "(../shared/tools/nemo-skills: build-venv.sh, then prepare-data.sh)"))
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_real_nemo_skills_stopped_while_generating_leaves_nothing_and_the_rerun_completes(
        stop, trained, tmp_path, lmalign_cache):
    """The signal cases against the real `ns` (its generation job in a session of its own)."""
    import signal
    import socket
    import time
    import uuid

    number = signal.Signals[stop]
    marker = f"lmalign-test-{uuid.uuid4().hex}"
    args = [sys.executable, "-m", "lmalign", "stage=eval", "run_name=sft", "eval=nemo",
            "eval.nemo.benchmarks=[gsm8k]", "eval.nemo.server=transformers",
            f"eval.nemo.nemo_env={REAL_NEMO_ENV}", "eval.checkpoints=[final]",
            "eval.nemo.nemo_args=['++max_samples=4']", "eval.nemo.inference.tokens_to_generate=16"]
    env = {**os.environ, "LMALIGN_CACHE": str(lmalign_cache), "LMALIGN_TEST_MARK": marker}
    log = tmp_path / "stopped.log"
    process = _start_stoppable(args, env, tmp_path, log)
    deadline = time.time() + 300
    while not [pid for pid in marked_processes(marker) if os.getsid(pid) != os.getsid(process.pid)
               and "nemo_skills.inference" in command_line(pid)]:
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    (server_log,) = (trained / "eval" / "final").glob("*.partial/server.log")
    port = int(re.search(r"--port (\d+)", server_log.read_text()).group(1))
    stopped_at = time.time()
    process.send_signal(number)
    assert process.wait(timeout=90) == 128 + number
    print(f"{stop}: lmalign exited {128 + number} after {time.time() - stopped_at:.1f} s")
    output = log.read_text()
    assert "Traceback" not in output and "stopped: " in output, output[-3000:]
    assert marked_processes(marker) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [p for p in (trained / "eval" / "final").glob("nemo-*") if (p / "cell.json").exists()]
    assert marked_processes(marker) == []

