"""stage=synthesize on the tiny task: a whole-conversation SFT run writes tiny-task questions
Magpie-style, answers them, a tiny reward model scores the answers; sft/ and preferences/ load
as datasets, the card's counts add up, and a killed run resumes with the same items once each."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import lmalign, lmalign_background, lmalign_in_process, typed_config
from lmalign import data, models
from lmalign.schema import SynthFilters
from lmalign.synthesis import filters

QUESTION = re.compile(r"^Which is the (largest|smallest): \d \d \d \d\?( Answer with the digit "
                      r"only\.)?$")
SMALL = ("synth.num_instructions=32", "synth.responses_per_instruction=4",
         "synth.instruction_max_new_tokens=64", "synth.response_max_new_tokens=32",
         "synth.min_margin=0.0001")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, generator_run, reward_run):
    return tmp_path_factory.mktemp("synthesis")


def _synthesis(workdir: Path, generator_run, reward_run, name: str, *extra: str):
    return ("stage=synthesize", f"run_name={name}", f"synth.generator={generator_run}",
            f"synth.reward_model={reward_run[0]}", *SMALL, *extra)


@pytest.fixture(scope="module")
def synthesized(workdir, generator_run, reward_run, lmalign_cache):
    lmalign(*_synthesis(workdir, generator_run, reward_run, "s"), cwd=workdir,
            cache=lmalign_cache, check=True)
    return workdir / "runs" / "s"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _instructions(run_dir: Path) -> list[dict]:
    return [row for shard in sorted((run_dir / "synth" / "instructions").glob("*.jsonl"))
            for row in _lines(shard)]


@pytest.mark.slow
def test_synthesis_writes_sft_data_and_pairs_that_load_and_a_card_that_adds_up(synthesized):
    made = _instructions(synthesized)
    assert [r["id"] for r in made] == [f"i{i:06d}" for i in range(32)]
    assert sum(bool(QUESTION.match(r["instruction"])) for r in made) >= 16

    sft, _ = data.load_splits(typed_config("dataset=local", f"dataset.path={synthesized / 'sft'}",
                                           "dataset.format=messages").dataset)
    pairs, _ = data.load_splits(typed_config(
        "dataset=local", f"dataset.path={synthesized / 'preferences' / 'data.jsonl'}",
        "dataset.format=preference", "method=dpo").dataset)
    assert len(sft) > 0 and len(pairs) > 0
    for row in _lines(synthesized / "preferences" / "data.jsonl"):
        assert row["chosen"] != row["rejected"]
        assert row["chosen_score"] - row["rejected_score"] >= 0.0001

    card = (synthesized / "synth.md").read_text()
    counts = dict(re.findall(r"^\| ([^|]+?) \| (\d+) \|$", card, re.MULTILINE))
    for what in ("instructions", "responses"):
        dropped = sum(int(n) for step, n in counts.items()
                      if step.startswith(f"{what} dropped: "))
        assert int(counts[f"{what} generated"]) == int(counts[f"{what} kept"]) + dropped
    assert int(counts["responses generated"]) == 4 * int(counts["instructions kept"])
    skipped = sum(int(n) for step, n in counts.items() if step.startswith("pairs skipped"))
    assert int(counts["preference pairs"]) + skipped == int(counts["sft rows"]) == len(sft)
    assert (synthesized / "synth-scores.png").stat().st_size > 0
    assert "generator: `" in card and "licence:" in card


@pytest.mark.slow
def test_a_judge_as_scorer_picks_right_answers_over_wrong_and_drops_what_it_cannot_grade(
        workdir, synthesized, generator_run, reward_run, lmalign_cache):
    """synth.scorer=judge over the generations of `synthesized` (copied: the same settings, so
    nothing is generated again): the test judge rates an answer by the tiny task's rule, so every
    pair prefers a right answer to a wrong one; answers it cannot grade are dropped and counted;
    a re-run asks nothing."""
    import shutil

    from judge_server import JudgeServer, correct

    run = workdir / "runs" / "judged"
    for step in (synthesized / "synth").glob("[ir]*"):
        if step.is_dir():
            shutil.copytree(step, run / "synth" / step.name)
    instructions = {r["id"]: r["instruction"] for r in _instructions(synthesized)}
    unreadable = next(text for text in instructions.values() if QUESTION.match(text))
    with JudgeServer(faults={unreadable: "no_rating"}) as judge:
        arguments = (*_synthesis(workdir, generator_run, reward_run, "judged"),
                     "synth.scorer=judge", "synth.judge.model=synth-judge",
                     f"synth.judge.base_url={judge.url}", "synth.judge.api_key_env=null")
        result = lmalign_in_process(*arguments, cwd=workdir, cache=lmalign_cache)
        assert result.returncode == 0, result.stderr[-3000:]
        asked = judge.count()
        again = lmalign_in_process(*arguments, cwd=workdir, cache=lmalign_cache)
        assert again.returncode == 0 and judge.count() == asked  # scores kept: nothing asked
        # Scored by one judge, the run refuses another (before scoring, a judge may change).
        other = lmalign_in_process(*arguments, "synth.judge.rubric=answer_quality",
                                   cwd=workdir, cache=lmalign_cache)
        assert other.returncode == 2 and other.stderr.startswith(
            "error: synth.judge.rubric='answer_quality': this run directory's synthesis was "
            "made with synth.judge.rubric='mt_bench'"), other.stderr
    pairs = _lines(run / "preferences" / "data.jsonl")
    assert pairs, "no pair had a right and a wrong answer"
    for pair in pairs:
        question = pair["prompt"][0]["content"]
        assert correct(question, pair["chosen"][0]["content"]), pair
        assert not correct(question, pair["rejected"][0]["content"]), pair
        assert (pair["chosen_score"], pair["rejected_score"]) == (9, 2)
    card = (run / "synth.md").read_text()
    counts = dict(re.findall(r"^\| ([^|]+?) \| (\d+) \|$", card, re.MULTILINE))
    ungraded = (run / "synth" / "scores.jsonl").read_text().count('"score": null')
    assert ungraded >= 1
    assert int(counts["responses ungraded: judge gave no valid grade"]) == ungraded
    dropped = sum(int(n) for step, n in counts.items() if step.startswith("responses dropped: "))
    assert int(counts["responses generated"]) == int(counts["responses kept"]) + dropped
    assert int(counts["responses scored"]) == int(counts["responses kept"]) - ungraded
    assert 0 < asked <= int(counts["responses kept"])  # an answer given twice is asked once
    assert "judge: `synth-judge`, mt_bench rubric" in card


def test_dedup_removes_planted_exact_and_near_duplicates():
    settings = SynthFilters(min_instruction_chars=1, max_instruction_chars=1000,
                            min_response_chars=1, max_response_chars=1000,
                            near_duplicate_threshold=0.7, exclude_patterns=["as an ai"],
                            decontaminate=[], decontamination_ngram=8,
                            decontamination_min_overlap=0.7)
    long = ("Write a short poem about the sea at night, with the moon over the water and the "
            "boats asleep in the harbour")
    items = [{"id": "a", "instruction": long},
             {"id": "b", "instruction": "  " + long.upper() + " "},           # exact, normalised
             {"id": "c", "instruction": long.replace("short", "brief")},      # near
             {"id": "d", "instruction": "Which is the largest: 3 8 1 5?"},
             {"id": "e", "instruction": "As an AI, tell me a joke"},
             {"id": "f", "instruction": "", "finish_reason": "stop"},
             {"id": "g", "instruction": "Unfinished question about", "finish_reason": "length"}]
    kept, dropped = filters.instructions(items, settings)
    assert [i["id"] for i in kept] == ["a", "d"]
    assert dropped == Counter(duplicate=1, near_duplicate=1, excluded=1, empty=1, truncated=1)


@pytest.mark.slow
def test_a_batch_that_misses_its_deadline_is_retried_then_named_and_finished_work_is_kept(
        workdir, generator_run, reward_run, lmalign_cache):
    result = lmalign_in_process(*_synthesis(workdir, generator_run, reward_run, "slow",
                                            "synth.batch_timeout_s=0.001"),
                                cwd=workdir, cache=lmalign_cache)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "step instructions, batch 0" in errors[0] and "then 8" in errors[0]
    assert "fix: a larger synth.batch_timeout_s" in errors[0]


@pytest.mark.slow
def test_sigkill_during_synthesis_then_rerun_gives_the_same_items_once_each(
        workdir, synthesized, generator_run, reward_run, lmalign_cache):
    arguments = _synthesis(workdir, generator_run, reward_run, "killed")
    process = lmalign_background(*arguments, cwd=workdir, cache=lmalign_cache,
                                 log=workdir / "killed.log")
    shards = workdir / "runs" / "killed" / "synth" / "instructions"
    deadline = time.monotonic() + 120
    while not list(shards.glob("*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(list(shards.glob("*.jsonl"))) == 1, "killed too late to test resuming"
    again = lmalign(*arguments, cwd=workdir, cache=lmalign_cache, check=True)
    run = workdir / "runs" / "killed"
    assert [r["id"] for r in _instructions(run)] == [f"i{i:06d}" for i in range(32)]
    answers = [r["id"] for step in sorted((run / "synth").glob("responses-*"))
               for shard in sorted(step.glob("*.jsonl")) for r in _lines(shard)]
    assert len(answers) == len(set(answers))
    assert not list((run / "synth").rglob(".*")), "a partial shard was left behind"
    assert "synthesized" in again.stdout + again.stderr
    # Seeded per batch: the resumed run made what the uninterrupted one made, text for text.
    assert _instructions(run) == _instructions(synthesized)
    assert (run / "preferences" / "data.jsonl").read_text() == \
        (synthesized / "preferences" / "data.jsonl").read_text()
    # Changed settings would not match the shards: refused.
    refused = lmalign_in_process(*arguments, "synth.num_instructions=40", cwd=workdir,
                                 cache=lmalign_cache)
    assert refused.returncode == 2 and "synth.num_instructions=40" in refused.stderr


def _refused(tmp_path: Path, cache: Path, *overrides: str, env: dict | None = None
             ) -> list[str]:
    """The error lines of a stage=synthesize command that must be refused (exit 2)."""
    result = lmalign_in_process("stage=synthesize", "run_name=s", *overrides, cwd=tmp_path,
                                cache=cache, env=env)
    assert result.returncode == 2, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_synthesis_names_missing_models_before_loading_anything(tmp_path, lmalign_cache):
    errors = _refused(tmp_path, lmalign_cache, "synth.filters.decontaminate=[gsm8k,gms8k]")
    assert len(errors) == 3, errors
    assert errors[0].startswith("error: synth.generator=None")
    assert errors[2].startswith("error: synth.filters.decontaminate='gms8k': no such named "
                                "prompt set or file") and "gsm8k" in errors[2]
    errors = _refused(tmp_path, lmalign_cache, "synth.generator=./nope",
                      "synth.reward_model=runs/nope/final")
    assert len(errors) == 2 and all("no such directory" in line for line in errors), errors
    # Hub ids not in the cache and no network: named before anything loads, not a traceback.
    errors = _refused(tmp_path, lmalign_cache, "synth.generator=org/gen",
                      "synth.reward_model=org/rm", env={"HF_HUB_OFFLINE": "1"})
    assert len(errors) == 2, errors
    assert errors[0].startswith("error: synth.generator='org/gen': revision main is not in")
    assert errors[1].endswith("or set synth.reward_model=/path/to/model")
    # A judge as scorer needs no reward model, but a rubric that grades one answer, and its key.
    errors = _refused(tmp_path, lmalign_cache, "synth.generator=./nope", "synth.scorer=judge",
                      "synth.judge.rubric=pairwise", "synth.judge.base_url=null")
    assert len(errors) == 2, errors
    assert errors[0].startswith("error: synth.judge.base_url=None: synth.scorer=judge needs")
    assert errors[1].startswith("error: synth.judge.rubric='pairwise': a pairwise rubric")
    errors = _refused(tmp_path, lmalign_cache, "synth.generator=./nope", "synth.scorer=judge",
                      "synth.judge.api_key_env=NO_SUCH_KEY")
    assert len(errors) == 2, errors
    assert errors[0].startswith("error: synth.judge.api_key_env='NO_SUCH_KEY': the judge's API "
                                "key variable NO_SUCH_KEY is not set")
    assert "no such directory" in errors[1]
    assert not (tmp_path / "runs").exists()


def test_dataset_synthetic_names_a_run_that_has_not_synthesized_and_formats_it_lacks(
        tmp_path, lmalign_cache):
    result = lmalign_in_process("method=lora", "dataset=synthetic", "dataset.from_run=nope",
                                cwd=tmp_path, cache=lmalign_cache)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: dataset.from_run='nope': no synthesized sft/ there")
    assert "stage=synthesize run_name=nope" in errors[0]
    result = lmalign_in_process("dataset=synthetic", "dataset.from_run=nope",
                                "dataset.format=text", cwd=tmp_path, cache=lmalign_cache)
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: dataset.format='text'") and "messages or preference" in \
        errors[0]
    assert not (tmp_path / "runs").exists()


def test_decontamination_drops_copied_evaluation_prompts_and_keeps_shared_boilerplate():
    """The shipped gsm8k, ifeval and tiny prompts, as the default synth.filters name them."""
    settings = typed_config("stage=synthesize", "synth.generator=g",
                            "synth.reward_model=r").synth.filters
    assert settings.decontaminate == ["gsm8k", "ifeval", "mt_bench", "tiny"]
    from lmalign.evaluation import prompts
    from lmalign.synthesis.pipeline import _benchmarks

    held_out = prompts.named_or_file("tiny")[0].turns[0]
    items = [
        # GSM8K's first test question with another opening and a changed last clause
        {"id": "a", "instruction": "Here is a puzzle. Janet's ducks lay 16 eggs per day. She "
         "eats three for breakfast every morning and bakes muffins for her friends every day "
         "with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
         "egg. What does she earn?"},
        # IFEval's boilerplate constraint around a new request (58% of the words of IFEval's
        # "Write a story about a family that goes camping ... in all capital letters."): kept
        {"id": "b", "instruction": "Describe a rainy afternoon in a small harbour town. Your "
         "entire response should be in English, and in all capital letters."},
        {"id": "c", "instruction": f"{held_out} Answer with the digit only."},  # tiny held-out
        {"id": "d", "instruction": "Which is the largest: 9 9 9 9?"},  # not a held-out list
        {"id": "e", "instruction": "Explain how a bicycle gear changes the effort of pedalling."},
    ]
    kept, dropped = filters.instructions(items, settings, _benchmarks(
        typed_config("stage=synthesize", "synth.generator=g", "synth.reward_model=r").synth))
    assert [i["id"] for i in kept] == ["b", "d", "e"]
    assert dropped == Counter({"contaminated (gsm8k)": 1, "contaminated (tiny)": 1})

    kept, dropped = filters.instructions(items, settings, None)  # decontaminate=[]
    assert len(kept) == 5 and not dropped


@pytest.mark.slow
def test_a_served_generator_and_a_question_answer_reward_model_make_the_data(
        workdir, generator_run, lmalign_cache):
    """synth.engine=transformers: lmalign serves the generator (transformers serve, for real),
    Magpie instructions as plain completions, answers as chats; the server ends with the stage,
    and a re-run with every shard made starts none. The reward model reads (question, answer)
    sentence pairs (BERT-style, no chat template), as OpenAssistant's deberta models do."""
    from conftest import marked_processes, write_pair_reward_model

    pair_model = write_pair_reward_model(workdir / "pair-rm")
    arguments = ("stage=synthesize", "run_name=served", f"synth.generator={generator_run}",
                 f"synth.reward_model={pair_model}", *SMALL, "synth.engine=transformers",
                 "synth.num_instructions=8", "synth.batch_size=8")
    result = lmalign(*arguments, cwd=workdir, cache=lmalign_cache, check=True,
                     env={"LMALIGN_TEST_MARK": "synth-served"})
    assert "as (question, answer) pairs" in result.stdout + result.stderr
    run = workdir / "runs" / "served"
    made = _instructions(run)
    assert [r["id"] for r in made] == [f"i{i:06d}" for i in range(8)]
    assert sum(bool(QUESTION.match(r["instruction"])) for r in made) >= 4, made
    assert len({r["instruction"] for r in made}) >= 4, made  # sampled, not greedy 8 times
    assert _lines(run / "sft" / "data.jsonl")
    assert not marked_processes("synth-served")
    log = run / "synth" / "server" / "server.log"
    lmalign(*arguments, cwd=workdir, cache=lmalign_cache, check=True)
    assert log.read_text().count("$ ") == 1  # started once: the re-run had nothing to ask


class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers: a server that hangs."""

    def __enter__(self):
        import socket
        import threading

        self.socket = socket.create_server(("127.0.0.1", 0))
        self.held: list = []

        def accept():
            while True:
                try:
                    self.held.append(self.socket.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}/v1"

    def __exit__(self, *_):
        self.socket.close()
        for connection in self.held:
            connection.close()


@pytest.mark.slow  # two deadlines of a second, in a whole stage run
def test_a_server_that_never_answers_misses_the_deadline_twice_then_the_stage_names_it(
        tmp_path, lmalign_cache):
    tiny = models.resolve(typed_config().model, str(lmalign_cache))
    reward_model = tmp_path / "rm"  # never loaded: the stage stops before scoring
    reward_model.mkdir()
    config = json.loads((Path(tiny) / "config.json").read_text())
    (reward_model / "config.json").write_text(json.dumps(
        {**config, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}))
    with SilentServer() as address:
        started = time.monotonic()
        result = lmalign_in_process(
            "stage=synthesize", "run_name=hang", f"synth.generator={tiny}",
            f"synth.reward_model={reward_model}", "synth.engine=external",
            f"synth.server_address={address}", "synth.num_instructions=4", "synth.batch_size=4",
            "synth.batch_timeout_s=1", cwd=tmp_path, cache=lmalign_cache)
        took = time.monotonic() - started
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: synth.batch_timeout_s=1")
    assert "step instructions, batch 0" in errors[0] and "4 sequences, then 2" in errors[0]
    assert took < 30  # the deadline, not the client's retries, ended it
