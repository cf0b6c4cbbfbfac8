"""eval=judge: an LLM judge over eval=generate's answers, against a real HTTP judge on 127.0.0.1
(tests/judge_server.py) that grades by the tiny task's own rule and injects faults."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import lmalign, lmalign_in_process
from judge_server import JudgeServer
from lmalign.evaluation import judge, prompts, rubrics
from lmalign.evaluation.server import JUDGE_SERVER_DIR

SECRET = "sk-lmalign-test-9f3c2e"
KEY_ENV = {"LMALIGN_TEST_JUDGE_KEY": SECRET}


def _judged(server: JudgeServer, *more: str) -> tuple[str, ...]:
    return ("stage=eval", "run_name=demo", "eval=[generate,judge]", "eval.generate.prompts=tiny",
            "eval.generate.max_new_tokens=32", "eval.generate.temperature=0",
            "eval.judge.model=test-judge", f"eval.judge.base_url={server.url}",
            "eval.judge.api_key_env=LMALIGN_TEST_JUDGE_KEY", *more)


def _metrics(run: Path, backend: str = "judge") -> dict[tuple[str, str, str], dict]:
    with open(run / "metrics.csv") as handle:
        return {(r["checkpoint"], r["eval_mode"], r["metric"]): r
                for r in csv.DictReader(handle) if r["backend"] == backend}


def _judgments(run: Path, label: str, rubric: str) -> list[dict]:
    (cell,) = [c for c in (run / "eval" / label).glob("judge-*")
               if f'"rubric": "{rubric}"' in (c / "cell.json").read_text()]
    return [json.loads(line) for line in (cell / judge.JUDGMENTS).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Rubrics: FastChat's prompts and readings


def _mt_bench(question_id: str) -> prompts.Prompt:
    return next(p for p in prompts._mt_bench() if p.id == question_id)


def test_mt_bench_grading_uses_fastchats_prompts_with_references_and_both_turns():
    writing, math = _mt_bench("81"), _mt_bench("111")
    single, pairwise = rubrics.load("mt_bench"), rubrics.load("pairwise")
    first = rubrics.single_messages(single, writing, 0, ["ANSWER-ONE"])
    assert first[0]["content"] == "You are a helpful assistant."
    assert "[Question]\n" + writing.turns[0] in first[1]["content"]
    assert "ANSWER-ONE" in first[1]["content"] and "Reference" not in first[1]["content"]
    second = rubrics.single_messages(single, writing, 1, ["ANSWER-ONE", "ANSWER-TWO"])
    assert "ANSWER-ONE" in second[1]["content"] and "ANSWER-TWO" in second[1]["content"]
    assert writing.turns[1] in second[1]["content"]
    with_reference = rubrics.single_messages(single, math, 0, ["x"])[1]["content"]
    assert math.reference[0] in with_reference and "Reference Answer" in with_reference
    pair = rubrics.pairwise_messages(pairwise, math, 1, ["a1", "a2"], ["b1", "b2"])[1]["content"]
    assert all(text in pair for text in ("a1", "a2", "b1", "b2", math.reference[1]))
    assert pair.index("a2") < pair.index("b2")


def test_ratings_verdicts_and_grades_are_read_as_fastchat_reads_them_or_are_invalid():
    assert rubrics.read_rating("Good. Rating: [[8]]", (1, 10)) == (8.0, None)
    assert rubrics.read_rating("Rating: [7.5]", (1, 10)) == (7.5, None)  # FastChat's fallback
    assert rubrics.read_rating("Rating: [[11]]", (1, 10))[1] == "rating 11 is outside 1-10"
    assert rubrics.read_rating("It is fine.", (1, 10))[1].startswith("no [[rating]]")
    assert rubrics.read_verdict("so [[B]]") == ("B", None)
    assert rubrics.read_verdict("a tie: [[C]]") == ("tie", None)
    assert rubrics.read_verdict("both good")[0] is None
    quality = rubrics.load("answer_quality")
    good = {name: 4 for name in quality.spec.criteria}
    assert rubrics.read_grades(quality, "Here: " + json.dumps(good) + " done") == (good, None)
    grades, reason = rubrics.read_grades(quality, json.dumps({**good, "clarity": 9}))
    assert grades is None and reason.startswith("clarity: Input should be less than or equal")
    assert rubrics.read_grades(quality, "{not json")[1] == "no JSON object in the judge's answer"
    schema = quality.response_format()["json_schema"]["schema"]
    assert set(schema["required"]) == set(good) and schema["additionalProperties"] is False


def test_a_bootstrap_interval_holds_the_mean_and_narrows_with_more_judgments():
    few = [1.0, 9.0, 5.0, 7.0]
    low, high = judge.bootstrap_interval(few, 1000, 0)
    assert low < sum(few) / 4 < high
    many_low, many_high = judge.bootstrap_interval(few * 25, 1000, 0)
    assert high - low > 2 * (many_high - many_low)
    assert judge.bootstrap_interval([3.0], 1000, 0) == (None, None)


@pytest.mark.parametrize("name, rubric, overrides, says", [
    ("judge alone", None, ("eval=judge",), "eval='[judge]': eval=judge grades the answers "
     "eval=generate makes"),
    ("with harness", None, ("eval=[harness,judge]",), "fix: 'eval=[harness,generate,judge]'"),
    ("no model", None, ("eval=[generate,judge]", "eval.judge.model=null"),
     "eval.judge.model=None: eval=judge needs a judge"),
    ("unset key", None, ("eval=[generate,judge]", "eval.judge.api_key_env=NO_SUCH_KEY_VAR"),
     "eval.judge.api_key_env='NO_SUCH_KEY_VAR': the judge's API key variable"),
    ("nowhere", None, ("eval=[generate,judge]", "eval.judge.base_url=http://127.0.0.1:9/v1"),
     "the judge does not answer there"),
    ("no rubric", None, ("eval=[generate,judge]", "eval.judge.rubric=nope.yaml"),
     "eval.judge.rubric='nope.yaml': no such rubric or file"),
    ("broken yaml", "kind: criteria\ncriteria: [\n", (), "not valid YAML at line"),
    ("no criteria", "kind: criteria\n", (), "kind: criteria needs at least one entry"),
    ("unknown key", "kind: single\nscael: [1, 10]\n", (), "scael: Extra inputs are not permitted"),
    ("bad scale", "kind: criteria\ncriteria:\n  x: {description: d, scale: [5, 1]}\n", (),
     "must be [low, high] with low < high"),
    ("baseline", None, ("eval=[generate,judge]", "eval.judge.rubric=pairwise",
                        "eval.checkpoints=[final]"),
     "eval.judge.baseline='base': pairwise judging compares"),
    ("own pairwise file", "kind: pairwise\n", ("eval.checkpoints=[final]",),
     "eval.judge.baseline='base': pairwise judging compares"),
    ("no other run", None, ("eval=[generate,judge]", "eval.judge.rubric=pairwise",
                            "eval.judge.baseline=no_such_run/base"),
     "eval.judge.baseline='no_such_run/base': no run no_such_run (looked in"),
])
def test_a_judge_that_cannot_work_is_one_line_before_training(name, rubric, overrides, says,
                                                              tmp_path, lmalign_cache):
    with JudgeServer() as server:
        chosen = ("eval=[generate,judge]", f"eval.judge.rubric={tmp_path / 'r.yaml'}") \
            if rubric else ()
        if rubric:
            (tmp_path / "r.yaml").write_text(rubric)
        with_generate = rubric or any("generate" in o for o in overrides)
        result = lmalign_in_process(
            *(["eval.generate.prompts=tiny"] if with_generate else []),
            "eval.judge.model=test-judge",
            f"eval.judge.base_url={server.url}", "eval.judge.api_key_env=LMALIGN_TEST_JUDGE_KEY",
            *chosen, *overrides, cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV)
        assert server.count() == 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (name, result.stderr[-2000:])
    assert lines[0].startswith("error: ") and says in lines[0] and "; fix: " in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_mistyped_baseline_of_another_run_is_refused_with_its_checkpoints(tmp_path,
                                                                          lmalign_cache):
    (tmp_path / "runs" / "earlier").mkdir(parents=True)
    (tmp_path / "runs" / "earlier" / "run.json").write_text("{}")
    with JudgeServer() as server:
        result = lmalign_in_process(*_judged(server, "eval.judge.rubric=pairwise",
                                             "eval.judge.baseline=earlier/bsae")[2:],
                                    cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "error: eval.judge.baseline='earlier/bsae': bsae is not a checkpoint of runs/earlier; "
        "allowed: earlier/base; fix: eval.judge.baseline=earlier/base")


def test_dry_run_prints_the_judge_calls_and_tokens_it_will_make(tmp_path, lmalign_cache):
    result = lmalign_in_process("dry_run=true", "eval=[generate,judge]", "eval.generate.prompts="
                                "mt_bench", "eval.judge.rubric=pairwise", cwd=tmp_path,
                                cache=lmalign_cache)
    assert result.returncode == 0, result.stderr
    assert "judge: pairwise rubric by gpt-4.1 at https://api.openai.com/v1; per checkpoint 320 " \
        "judge request(s)" in result.stdout  # 80 questions x 2 turns x 2 orders


# ---------------------------------------------------------------------------------------------
# Judging the trained tiny model and its base


@pytest.fixture
def demo_copy(default_run, tmp_path):
    shutil.copytree(default_run[1], tmp_path / "runs" / "demo")
    return tmp_path / "runs" / "demo"


FAULTS = {"1 9 2 7": "429", "2 4 9 5": "500", "4 8 3 2": "slow", "6 0 5 1": "garbled",
          "0 9 5 6": "no_rating"}


@pytest.mark.slow
def test_the_judge_ranks_the_trained_model_far_above_base_survives_faults_and_never_asks_twice(
        demo_copy, tmp_path, lmalign_cache):
    chosen = prompts._tiny()[:16]
    faults = {piece: kind for piece, kind in FAULTS.items()
              if any(piece in p.turns[0] for p in chosen)}
    assert len(faults) == 5, "the faults must hit questions of the judged set"
    with JudgeServer(faults=faults, slow_s=4) as server:
        # a judge name of its own: the session's judgment cache holds other tests' replies
        args = _judged(server, "eval.generate.max_prompts=16", "eval.judge.request_timeout_s=2",
                       "eval.judge.max_retries=2", "eval.judge.model=faulty-judge")
        result = lmalign(*args, cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV, check=True)
        metrics = _metrics(demo_copy)
        final, base = (float(metrics[(label, "mt_bench", "score")]["value"])
                       for label in ("final", "base"))
        assert final >= 7 and base <= 3, (final, base)
        row = metrics[("final", "mt_bench", "score")]
        assert float(row["ci_low"]) <= final <= float(row["ci_high"])
        # garbled and no_rating answers are invalid for both checkpoints; the rest were retried
        assert {label: float(metrics[(label, "mt_bench", "invalid")]["value"])
                for label in ("base", "final")} == {"base": 2.0, "final": 2.0}
        reasons = {j["prompt_id"]: j["reason"] for j in _judgments(demo_copy, "final", "mt_bench")
                   if not j["valid"]}
        assert len(reasons) == 2 and any("no [[rating]]" in r for r in reasons.values())
        assert any("APIResponseValidationError" in r or "JSONDecodeError" in r
                   for r in reasons.values()), reasons
        assert server.count("429") == 2 and server.count("500") == 2 and server.count("slow") == 2
        record = json.loads(next((demo_copy / "eval" / "final").glob("judge-*/cell.json"))
                            .read_text())
        assert record["usage"]["requests"] == 16 and record["usage"]["prompt_tokens"] > 0
        assert "invalid" in result.stdout and "score" in result.stdout

        asked = server.count()
        lmalign(*args, cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV, check=True)
        assert server.count() == asked  # the cells are done
        for cell in demo_copy.glob("eval/*/judge-*"):
            shutil.rmtree(cell)
        lmalign(*args, cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV, check=True)
        # every reply came back from the judgment cache but the invalid ones: no reply
        # (garbled) or none the rubric reads (no_rating) is asked again
        assert server.count() - asked == 4
        assert server.count("garbled") == 4 and server.count("no_rating") == 4
        assert _metrics(demo_copy)[("final", "mt_bench", "score")]["value"] == row["value"]

    with JudgeServer() as server:  # no faults from here on
        lmalign(*_judged(server, "eval.generate.max_prompts=40", "eval.judge.rubric=pairwise"),
                cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV, check=True)
        pairwise = _metrics(demo_copy)
        win_rate = pairwise[("final", "pairwise", "win_rate")]["value"]
        assert float(win_rate) > 0.9
        assert ("base", "pairwise", "win_rate") not in pairwise  # the baseline itself
        verdicts = _judgments(demo_copy, "final", "pairwise")
        assert len(verdicts) == 40 and set(verdicts[0]["judge_text"]) == {"AB", "BA"}
        assert server.count() == 80  # both orders

        # the baseline's answers from another run: the same comparison, every reply cached
        shutil.copytree(demo_copy, tmp_path / "runs" / "earlier")
        lmalign(*_judged(server, "eval.generate.max_prompts=40", "eval.judge.rubric=pairwise",
                         "eval.judge.baseline=earlier/base", "eval.checkpoints=[final]"),
                cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV, check=True)
        assert server.count() == 80
        assert len(list(demo_copy.glob("eval/final/judge-*"))) == 3  # mt_bench, both pairwise
        with open(demo_copy / "metrics.csv") as handle:
            assert sorted(r["value"] for r in csv.DictReader(handle)
                          if r["metric"] == "win_rate") == [win_rate, win_rate]

        lmalign(*_judged(server, "eval.generate.max_prompts=16",
                         "eval.judge.rubric=answer_quality"),
                cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV, check=True)
        quality = _metrics(demo_copy)
        assert float(quality[("final", "answer_quality", "correctness")]["value"]) >= 4.5
        assert float(quality[("base", "answer_quality", "correctness")]["value"]) <= 2
        assert float(quality[("final", "answer_quality", "clarity")]["value"]) == 3
        # the rubric is the rows' eval_mode: one rubric's rows name no settings of the others
        assert quality[("final", "mt_bench", "score")]["settings"] == ""
    cache = lmalign_cache / judge.CACHE_SUBDIR
    for folder in (demo_copy, cache):
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix not in (".safetensors", ".bin", ".pt"):
                assert SECRET not in path.read_text(errors="ignore"), path


@pytest.mark.slow
def test_criteria_answers_are_parsed_where_the_endpoint_refuses_response_format(
        demo_copy, tmp_path, lmalign_cache):
    with JudgeServer(accepts_response_format=False) as server:
        result = lmalign(*_judged(server, "eval.generate.max_prompts=6",
                                  "eval.checkpoints=[final]", "eval.judge.rubric=answer_quality",
                                  "eval.judge.model=another-judge"),  # nothing cached for it
                         cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV, check=True)
    assert "refused response_format" in result.stderr + result.stdout
    from lmalign import report

    shutil.copytree(demo_copy, tmp_path / "runs" / "other")
    report.collate(tmp_path / "runs")  # two runs side by side, as a sweep's summary has them
    samples = (tmp_path / "runs" / "samples.md").read_text()
    assert "- **demo final** (eos" in samples and "- **other final** (eos" in samples
    quality = _metrics(demo_copy)
    assert float(quality[("final", "answer_quality", "correctness")]["value"]) >= 4.5
    assert float(quality[("final", "answer_quality", "invalid")]["value"]) == 0


@pytest.mark.slow
def test_a_run_stopped_then_killed_mid_judging_resumes_with_every_judgment_once(
        demo_copy, tmp_path, lmalign_cache):
    import os

    with JudgeServer(latency_s=0.25) as server:
        args = _judged(server, "eval.generate.max_prompts=40", "eval.checkpoints=[final]",
                       "eval.judge.concurrency=2",
                       "eval.judge.model=resume-judge")  # not the faulty replies cached before
        for number, after in ((signal.SIGTERM, 8), (signal.SIGKILL, 20)):
            process = subprocess.Popen(
                [sys.executable, "-m", "lmalign", *args], cwd=tmp_path, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "LMALIGN_CACHE": str(lmalign_cache), **KEY_ENV})
            deadline = time.monotonic() + 300
            while server.count() < after and time.monotonic() < deadline \
                    and process.poll() is None:
                time.sleep(0.05)
            sent = time.monotonic()
            process.send_signal(number)
            _, stderr = process.communicate(timeout=60)
            if number == signal.SIGTERM:  # queued requests are dropped, not sent first
                assert process.returncode == 143 and time.monotonic() - sent < 10, stderr[-800:]
                assert "stopped: SIGTERM" in stderr
            assert not list(demo_copy.glob("eval/final/judge-*/cell.json"))
        killed_at = server.count()
        assert 20 <= killed_at < 40
        lmalign(*args, cwd=tmp_path, cache=lmalign_cache, env=KEY_ENV, check=True)
        judged = _judgments(demo_copy, "final", "mt_bench")
        assert sorted(j["prompt_id"] for j in judged) == sorted(f"tiny-{i}" for i in range(40))
        assert all(j["valid"] for j in judged), [j["reason"] for j in judged if not j["valid"]]
        # each stop lost at most the 2 requests in flight; nothing was asked twice otherwise
        assert server.count() <= 40 + 2 * 2, server.count()
        assert sum(j["cached"] for j in judged) >= killed_at - 2 * 2


@pytest.mark.slow
def test_a_served_llm_that_cannot_grade_makes_every_judgment_invalid_and_the_run_says_so(
        demo_copy, tmp_path, lmalign_cache):
    """eval.judge.server=transformers: lmalign serves the judge (here the tiny model itself, a
    real LLM server that cannot grade) after generating, and stops it."""
    from conftest import marked_processes

    result = lmalign("stage=eval", "run_name=demo", "eval=[generate,judge]",
                     "eval.generate.prompts=tiny", "eval.generate.max_prompts=3",
                     "eval.generate.max_new_tokens=32", "eval.checkpoints=[final]",
                     f"eval.judge.model={demo_copy / 'final'}", "eval.judge.server=transformers",
                     "eval.judge.max_tokens=48", cwd=tmp_path, cache=lmalign_cache,
                     env={"LMALIGN_TEST_MARK": "served-judge"}, check=True)
    judged = _judgments(demo_copy, "final", "mt_bench")
    assert len(judged) == 3 and not any(j["valid"] for j in judged)
    # No rating on the scale came back: the tiny model's answer holds none, or (transformers
    # serve from 5.2x checks prompt lengths) the server refused the 837-token mt_bench judge
    # prompt, longer than the tiny model's 512-token context. Never a crash or a score.
    reasons = [j["reason"] for j in judged]
    assert all(reason == "no [[rating]] in the judge's answer" or reason.startswith(
        ("rating ", "BadRequestError: Error code: 400")) for reason in reasons), reasons
    assert float(_metrics(demo_copy)[("final", "mt_bench", "invalid")]["value"]) == 3
    assert "every judgment is invalid" in result.stdout + result.stderr
    assert "serve" in (demo_copy / JUDGE_SERVER_DIR / "server.log").read_text()
    assert not marked_processes("served-judge")  # the judge's server was stopped
