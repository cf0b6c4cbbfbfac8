"""User errors: `python -m lmalign` exits 2 with one `error:` line per problem, no traceback."""

from __future__ import annotations

import re

import pytest

from conftest import lmalign


def _errors(result) -> list[str]:
    assert "Traceback" not in result.stderr + result.stdout
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines and all(l.startswith("error: ") for l in lines), result.stderr
    return lines


@pytest.fixture
def run(tmp_path, lmalign_cache):
    return lambda *overrides, **kw: lmalign(*overrides, cwd=tmp_path, cache=lmalign_cache, **kw)


def test_unknown_group_option_lists_the_available_ones(run):
    result = run("model=smollm3")
    assert result.returncode == 2
    (line,) = _errors(result)
    assert "model=smollm3" in line and "no such option in group 'model'" in line
    for option in ("tiny", "smollm2_135m", "qwen3_0.6b_base", "llama3.2_3b"):
        assert option in line
    assert "_hub" not in line  # shared bases are not options


def test_non_numeric_learning_rate(run):
    result = run("method.learning_rate=fast")
    assert result.returncode == 2
    (line,) = _errors(result)
    assert "method.learning_rate='fast'" in line and "a number" in line and "fix:" in line


def test_batch_that_does_not_divide(run):
    result = run("method.global_batch_size=12")
    assert result.returncode == 2
    (line,) = _errors(result)
    assert "method.global_batch_size=12" in line
    assert "16 x 1 = 16" in line and "fix: method.global_batch_size=16" in line


def test_preference_method_on_a_non_preference_dataset(run):
    result = run("method=dpo")
    assert result.returncode == 2
    (line,) = _errors(result)
    assert "method=dpo" in line and "dataset=tiny_sft" in line and "fix: dataset=tiny_prefs" in line


def test_hub_model_not_available_offline_says_how_to_fix(run, tmp_path):
    result = run("model=smollm2_135m", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    (line,) = _errors(result)
    assert "HuggingFaceTB/SmolLM2-135M" in line and "HF_HUB_OFFLINE=1" in line
    assert "hf download HuggingFaceTB/SmolLM2-135M --revision main" in line


def test_all_problems_are_reported_together(run):
    result = run("model=foo", "method.learning_rate=abc", "hardware.precision=fp64",
                 "method.learning_rat=3")
    assert result.returncode == 2
    lines = _errors(result)
    assert len(lines) == 4
    text = "\n".join(lines)
    assert "model=foo" in text and "method.learning_rate='abc'" in text
    assert "hardware.precision='fp64'" in text and "one of fp32, bf16, fp16" in text
    assert "did you mean method.learning_rate?" in text


def test_unknown_task_is_caught_before_training(run):
    result = run("eval.tasks=[hellaswagg]", "run_name=t")
    assert result.returncode == 2
    (line,) = _errors(result)
    assert "hellaswagg" in line and "eval.tasks=[hellaswag]" in line
    assert "training" not in result.stdout + result.stderr


def test_help_still_works(run):
    result = run("--help")
    assert result.returncode == 0 and "model:" in result.stdout


def test_missing_local_dataset_path(run):
    result = run("dataset=local")
    assert result.returncode == 2
    assert re.search(r"dataset.path=None: dataset.source=local needs a path", _errors(result)[0])


def test_each_bad_sweep_value_is_named(run):
    result = run("-m", "model=tiny,foo,bar")
    assert result.returncode == 2
    lines = _errors(result)
    assert len(lines) == 2
    assert lines[0].startswith("error: model=foo:") and lines[1].startswith("error: model=bar:")


def test_sweep_jobs_cannot_share_a_run_name(run, tmp_path):
    result = run("-m", "run_name=shared", "method.learning_rate=1e-3,2e-3", "dry_run=true")
    assert result.returncode == 2
    (line,) = _errors(result)
    assert line.startswith("error: run_name='shared': sweep job 1") and "with job 0" in line
    assert "fix: sweep run_name too" in line
    varied = run("-m", "run_name=exp_${hydra:job.num}", "method.learning_rate=1e-3,2e-3",
                 "dry_run=true", check=True)
    assert f"{tmp_path}/runs/exp_0" in varied.stdout and f"{tmp_path}/runs/exp_1" in varied.stdout
