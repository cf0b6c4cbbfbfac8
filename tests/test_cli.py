"""User errors: `python -m lmalign` exits 2 with one `error:` line per problem, no traceback."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import FIXTURES, lmalign, lmalign_in_process

# Every user error below, also run against an existing trained run (tests/test_run.py), where
# it must leave every file of that run as it was: (overrides, environment).
ERROR_CASES = [
    (("model=smollm3",), {}),
    (("method.learning_rate=fast",), {}),
    (("method.global_batch_size=12",), {}),
    (("method.global_batch_size=7",), {}),
    (("method=dpo",), {}),
    (("model=smollm2_135m",), {"HF_HUB_OFFLINE": "1"}),
    (("model=foo", "method.learning_rate=abc", "hardware.precision=fp64",
      "method.learning_rat=3"), {}),
    (("eval.harness.tasks=[hellaswagg]",), {}),
    (("stage=eval", "eval.harness.tasks=[hellaswg]"), {}),
    (("stage=eval", "eval.checkpoints=[checkpoint-7]"), {}),
    (("stage=merge",), {}),
    (("dataset=local",), {}),
    (("-m", "model=tiny,foo,bar"), {}),
    (("-m", "method.learning_rate=1e-3,2e-3", "dry_run=true"), {}),
]


def _errors(result) -> list[str]:
    assert "Traceback" not in result.stderr + result.stdout
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines and all(l.startswith("error: ") for l in lines), result.stderr
    return lines


@pytest.fixture
def run(tmp_path, lmalign_cache):
    """A command run in this process (the CLI keeps no state between commands), or with
    in_subprocess=True as `python -m lmalign` in its own interpreter."""
    def refused_or_not(*overrides, in_subprocess=False, check=False, env=None):
        if in_subprocess:
            result = lmalign(*overrides, cwd=tmp_path, cache=lmalign_cache, check=check, env=env)
        else:
            result = lmalign_in_process(*overrides, cwd=tmp_path, cache=lmalign_cache, env=env)
            assert not check or result.returncode == 0, result.stderr[-3000:]
        if result.returncode == 2:  # a refused command leaves no directory behind
            assert not (tmp_path / "outputs").exists() and not (tmp_path / "runs").exists()
        return result
    return refused_or_not


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
                 "method.learning_rat=3", in_subprocess=True)
    assert result.returncode == 2
    lines = _errors(result)
    assert len(lines) == 4
    text = "\n".join(lines)
    assert "model=foo" in text and "method.learning_rate='abc'" in text
    assert "hardware.precision='fp64'" in text and "one of fp32, bf16, fp16" in text
    assert "did you mean method.learning_rate?" in text


@pytest.mark.slow  # a whole command with lm-eval's task scan
def test_unknown_task_is_caught_before_training(run):
    result = run("eval.harness.tasks=[hellaswagg]", "run_name=t")
    assert result.returncode == 2
    (line,) = _errors(result)
    assert "hellaswagg" in line and "eval.harness.tasks=[hellaswag]" in line
    assert "training" not in result.stdout + result.stderr


def test_hub_tasks_without_network_are_refused_in_seconds_before_training(run):
    import socket
    import time

    with socket.socket() as probe:  # a hub endpoint nothing answers
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    started = time.time()
    result = run("eval.harness.tasks=[arc_easy,tiny_mc]", "run_name=t",
                 env={"HF_ENDPOINT": endpoint})
    assert result.returncode == 2 and time.time() - started < 60
    (line,) = _errors(result)
    assert line.startswith("error: eval.harness.tasks=['arc_easy']: their datasets come from "
                           "the hub, which cannot be reached") and "HF_DATASETS_OFFLINE=1" in line


def test_an_evaluation_key_of_the_old_flat_layout_names_its_new_place(run):
    result = run("eval.tasks=[tiny_mc]", "eval.benchmarks=[gsm8k]", "eval=none",
                 "eval.harness.limit=3")
    assert result.returncode == 2
    lines = _errors(result)
    assert lines[0] == ("error: eval.tasks=[tiny_mc]: no such key; allowed: evaluation settings "
                        "under their backend (eval.harness.*); fix: eval=harness "
                        "eval.harness.tasks=[tiny_mc]")
    assert lines[1].endswith("fix: eval=nemo eval.nemo.benchmarks=[gsm8k]")
    assert lines[2].startswith("error: eval.harness.limit=3: no such key; allowed: eval.harness.* "
                               "once eval selects harness (selected: none); fix: "
                               "'eval=[harness]', or eval=harness")
    assert len(lines) == 3


def test_help_still_works(run):
    result = run("--help", in_subprocess=True)
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
    assert "Warning" not in varied.stderr  # the sweep's own checks resolved every job's name


def test_a_broken_recipe_of_your_own_is_one_line_naming_the_file_and_where(run, tmp_path):
    """--config-dir: your recipes beside ours. A file that is not YAML, and a defaults list that
    chooses an option that does not exist, each give one line, not a traceback."""
    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "unclosed.yaml").write_text("# @package _global_\nmethod:\n  learning_rate: [1\n")
    (mine / "typo.yaml").write_text("# @package _global_\ndefaults:\n"
                                    "  - override /method: lorra\n")
    (mine / "fine.yaml").write_text("# @package _global_\nmethod:\n  max_steps: 3\n")

    broken = run("--config-dir", str(tmp_path / "myconf"), "+experiment=unclosed")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    (line,) = _errors(broken)
    assert line.startswith(f"error: experiment='unclosed': {mine / 'unclosed.yaml'} is not valid "
                           "YAML at line 4, column 1 (while parsing a flow sequence at line 3, "
                           "column 18: expected ',' or ']'")
    assert line.endswith(f"fix: correct line 3 of {mine / 'unclosed.yaml'}")

    typo = run("--config-dir", str(tmp_path / "myconf"), "model=tiny", "+experiment=typo",
               "hardware=a10")
    assert typo.returncode == 2
    assert _errors(typo) == [
        "error: hardware=a10: no such option in group 'hardware'; allowed: 8gpu_fsdp, "
        "8gpu_zero3, a100, cpu, cpu_ddp, t4; fix: hardware=a100",
        "error: method=lorra: no such option in group 'method', chosen by the defaults list of "
        "+experiment=typo; allowed: dpo, grpo, kto, lora, prompt_tuning, reward, rloo, sft; fix: "
        "override /method: lora in that file"]

    # Beside a good recipe of yours, a mistake elsewhere is still named for what it is.
    beside = run("--config-dir", str(tmp_path / "myconf"), "+experiment=fine", "model=tinyy")
    assert beside.returncode == 2
    (line,) = _errors(beside)
    assert line.startswith("error: model=tinyy: no such option in group 'model'")


def test_a_dry_run_plans_a_run_whose_inputs_are_not_here_yet_and_says_so(run):
    """A plan written before the data is copied or the first run trained (a SLURM pipeline):
    the plan names what must exist when the run starts; the run itself refuses without it."""
    planned = run("dataset=local", "dataset.path=data/chats.jsonl", "model.init_from=sft_run",
                  "dry_run=true", check=True)
    assert "local: data/chats.jsonl (not found here: it must exist where the run starts)" \
        in planned.stdout
    assert "starts from    sft_run (not trained yet: its final/ must exist" in planned.stdout
    refused = run("dataset=local", "dataset.path=data/chats.jsonl")
    assert refused.returncode == 2
    assert _errors(refused)[0].startswith("error: dataset.path='data/chats.jsonl': no such file")


@pytest.mark.slow  # whole commands: about 7 s
def test_a_dry_run_leaves_nothing_behind(run, tmp_path):
    result = run("dry_run=true", in_subprocess=True)
    assert result.returncode == 0 and "run directory" in result.stdout
    assert not list(tmp_path.iterdir())


def _old_layout_run(tmp_path, name: str = "old"):
    """A run recorded by an earlier lmalign (tests/fixtures/old_layout_run), without weights."""
    run_dir = tmp_path / "runs" / name
    shutil.copytree(FIXTURES / "old_layout_run", run_dir)
    return run_dir


def test_stage_eval_on_a_run_name_that_does_not_exist_names_the_runs_that_do(tmp_path,
                                                                          lmalign_cache):
    _old_layout_run(tmp_path)
    result = lmalign("stage=eval", "run_name=olde", cwd=tmp_path, cache=lmalign_cache)
    assert result.returncode == 2
    (line,) = _errors(result)
    assert line.startswith("error: run_name='olde': stage=eval evaluates a run; there is no run "
                           "named 'olde'") and "the runs in runs: old;" in line
    assert "fix: run_name=<one of them>" in line and "eval.checkpoints=[base]" in line
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["old"]


def test_an_old_layout_record_is_read_with_the_keys_added_since_filled_in(tmp_path):
    from lmalign import rundir

    run_dir = _old_layout_run(tmp_path)
    assert "padding_free" not in (run_dir / ".hydra" / "config.yaml").read_text()
    config = rundir.saved_config(run_dir)
    assert config.trains and config.run_name == "demo" and config.method.max_steps == 500
    assert config.method.padding_free is False and config.cache.retries == 3  # filled
    assert rundir.saved_overrides(run_dir) == ["run_name=demo"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
