"""eval=generate: answers for every checkpoint, on the trained tiny model and its base."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import lmalign, lmalign_in_process
from lmalign.evaluation import generate

TINY = ("stage=eval", "run_name=demo", "eval=generate", "eval.generate.prompts=tiny")


def test_a_loop_at_the_end_is_repetition_and_a_plain_answer_is_not():
    assert generate.repeats_at_end("The largest is 7. The largest is 7. The largest is 7.")
    assert generate.repeats_at_end("and then " + "ha" * 6)
    assert generate.repeats_at_end("wait" + "!" * 12)
    assert not generate.repeats_at_end("The largest is 7.")
    assert not generate.repeats_at_end("Well... maybe!!")  # short runs are punctuation
    assert not generate.repeats_at_end("")
    assert generate.distinct_2(["a b a b", "a b"]) == pytest.approx(2 / 4)
    assert generate.distinct_2(["one"]) is None


@pytest.mark.parametrize("name, text, overrides, says", [
    ("missing", None, (), "eval.generate.prompts='nope.jsonl': no such named set or file"),
    ("columns", '{"question": "hi"}\n', (),
     "has neither a 'prompt' nor a 'turns' column (columns: question)"),
    ("mapped wrong", '{"question": "hi"}\n', ("+eval.generate.columns.prompt=q",),
     "has neither a 'q' nor"),
    ("empty turn", '{"prompt": "hi"}\n{"prompt": " "}\n', (), "row 2 has no prompt text"),
    ("unknown field", '{"prompt": "hi"}\n', ("+eval.generate.columns.answer=x",),
     "eval.generate.columns.answer='x': not a prompt field"),
    ("broken", '{"prompt": "hi"}\n{"prompt": \n', (), "line 2, column 12: not JSON"),
    ("a plain directory", "", ("eval.generate.prompts=.",), "save_to_disk did not write"),
    ("greedy samples", '{"prompt": "hi"}\n', ("eval.generate.temperature=0",
                                               "eval.generate.num_samples=3"),
     "eval.generate.num_samples=3: greedy decoding"),
])
def test_a_prompts_file_that_cannot_serve_is_one_line_before_training(
        name, text, overrides, says, tmp_path, lmalign_cache):
    if text is not None:
        (tmp_path / "nope.jsonl").write_text(text)
    result = lmalign_in_process("eval=generate", "eval.generate.prompts=nope.jsonl", *overrides,
                                cwd=tmp_path, cache=lmalign_cache)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (name, result.stderr[-2000:])
    assert lines[0].startswith("error: ") and says in lines[0] and "; fix: " in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_prompts_file_maps_its_columns_and_keeps_multi_turn_rows(tmp_path):
    from conftest import typed_config
    from lmalign.evaluation import prompts

    (tmp_path / "p.jsonl").write_text(
        json.dumps({"key": "a", "q": "one?"}) + "\n"
        + json.dumps({"key": "b", "dialogue": ["first?", "second?"]}) + "\n")
    config = typed_config("eval=generate", f"eval.generate.prompts={tmp_path / 'p.jsonl'}",
                          "+eval.generate.columns.prompt=q", "+eval.generate.columns.id=key",
                          "+eval.generate.columns.turns=dialogue")
    found = prompts.load(config.eval.generate)
    assert [(p.id, p.turns) for p in found] == [("a", ("one?",)), ("b", ("first?", "second?"))]
    mt_bench = prompts.load(typed_config("eval=generate").eval.generate)
    assert len(mt_bench) == 80 and all(len(p.turns) == 2 for p in mt_bench)
    assert len({p.category for p in mt_bench}) == 8
    assert sum(p.reference is not None for p in mt_bench) == 30


@pytest.fixture
def demo_copy(default_run, tmp_path):
    shutil.copytree(default_run[1], tmp_path / "runs" / "demo")
    return tmp_path / "runs" / "demo"


def _answers(cell: Path) -> list[dict]:
    return [json.loads(line) for line in (cell / generate.GENERATIONS).read_text().splitlines()]


@pytest.mark.slow
def test_the_trained_model_stops_the_base_does_not_and_turn_two_follows_its_own_turn_one(
        demo_copy, tmp_path, lmalign_cache):
    result = lmalign(*TINY, "eval.generate.max_prompts=20", "eval.generate.num_samples=2",
                     "eval.generate.max_new_tokens=40", cwd=tmp_path, cache=lmalign_cache,
                     check=True)
    with open(demo_copy / "metrics.csv") as handle:
        import csv

        eos = {r["checkpoint"]: float(r["value"]) for r in csv.DictReader(handle)
               if r["backend"] == "generate" and r["metric"] == "eos_rate"}
    assert eos["final"] >= 0.9 and eos["base"] < 0.1, eos
    (cell,) = (demo_copy / "eval" / "final").glob("generate-*")
    answers = _answers(cell)
    assert len(answers) == 40 and len({(a["prompt_id"], a["sample"]) for a in answers}) == 40
    assert all(a["finish_reason"] in ("eos", "length") and a["new_tokens"] > 0 for a in answers)
    assert "eos_rate" in result.stdout and (demo_copy / generate.SAMPLES_MD).exists()
    samples = (demo_copy / generate.SAMPLES_MD).read_text()
    assert "**base** (length" in samples and "**final** (eos" in samples
    again = lmalign(*TINY, "eval.generate.max_prompts=20", "eval.generate.num_samples=2",
                    "eval.generate.max_new_tokens=40", cwd=tmp_path, cache=lmalign_cache,
                    check=True)
    assert "generate cell done, skipping" in again.stdout + again.stderr

    lmalign("stage=eval", "run_name=demo", "eval=generate", "eval.generate.prompts=mt_bench",
            "eval.generate.max_prompts=2", "eval.generate.max_new_tokens=24",
            "eval.checkpoints=[final]", cwd=tmp_path, cache=lmalign_cache, check=True)
    (cell,) = [c for c in (demo_copy / "eval" / "final").glob("generate-*")
               if '"prompts": "mt_bench"' in (c / "cell.json").read_text()]
    answers = _answers(cell)
    assert [(a["prompt_id"], a["turn"]) for a in answers] == [("81", 0), ("81", 1),
                                                              ("82", 0), ("82", 1)]
    for first, second in ((answers[0], answers[1]), (answers[2], answers[3])):
        assert first["question"] in second["prompt"] and first["answer"] in second["prompt"]
        assert second["prompt"].endswith(second["question"] + "<|end|>\n<|assistant|>\n")


@pytest.mark.slow
def test_a_run_killed_mid_generation_resumes_with_one_answer_per_prompt_and_sample(
        demo_copy, tmp_path, lmalign_cache):
    args = [sys.executable, "-m", "lmalign", *TINY, "eval.checkpoints=[base]",
            "eval.generate.max_prompts=48", "eval.generate.num_samples=2",
            "eval.generate.batch_size=4", "eval.generate.max_new_tokens=48"]
    env = {**__import__("os").environ, "LMALIGN_CACHE": str(lmalign_cache)}
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    shards = demo_copy / "eval" / "base"
    deadline = time.time() + 120
    while len(list(shards.glob("generate-*.partial/shards/*.jsonl"))) < 3:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list(shards.glob("generate-*/cell.json"))  # killed before the cell was written
    written = {p.name: p.read_text() for p in shards.glob("generate-*.partial/shards/*.jsonl")}
    done = len(written)
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # killed again, after one more shard
    while len(list(shards.glob("generate-*.partial/shards/*.jsonl"))) < done + 1:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    again = {p.name: p.read_text() for p in shards.glob("generate-*.partial/shards/*.jsonl")}
    assert {name: again[name] for name in written} == written  # added to, never replaced
    done = len(again)
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"turn 1, 4/{96 - 4 * done} answers" in result.stdout  # only what was missing
    (cell,) = [c for c in shards.glob("generate-*") if not c.name.endswith(".partial")]
    keys = [(a["prompt_id"], a["turn"], a["sample"]) for a in _answers(cell)]
    assert len(keys) == len(set(keys)) == 96
    assert not list(shards.glob("generate-*.partial"))


@pytest.mark.slow
def test_a_prompt_tuning_adapter_answers_with_its_virtual_tokens_unmerged(tmp_path,
                                                                          lmalign_cache):
    lmalign("run_name=pt", "method=prompt_tuning", "method.max_steps=2", "eval=generate",
            "eval.generate.prompts=tiny", "eval.generate.max_prompts=4",
            "eval.generate.max_new_tokens=8", "eval.generate.temperature=1.0",
            cwd=tmp_path, cache=lmalign_cache, check=True)
    run_dir = tmp_path / "runs" / "pt"
    assert (run_dir / "final" / "adapter_config.json").exists()
    (cell,) = (run_dir / "eval" / "final").glob("generate-*")
    answers = _answers(cell)
    assert len(answers) == 4 and all(a["new_tokens"] > 0 for a in answers)
    (base,) = (run_dir / "eval" / "base").glob("generate-*")
    # Both draw with the same seed from the same base weights: only the virtual tokens, in
    # effect unmerged, make final's answers differ from base's.
    assert [a["answer"] for a in answers] != [a["answer"] for a in _answers(base)]


@pytest.mark.slow
def test_a_served_checkpoint_answers_through_the_openai_client_and_the_server_stops(
        demo_copy, tmp_path, lmalign_cache):
    """engine=transformers: `transformers serve` returns one choice per request, so the samples
    come from repeated requests; it leaves no process behind."""
    import os
    import uuid

    from conftest import marked_processes

    marker = f"lmalign-test-{uuid.uuid4().hex}"
    result = lmalign(*TINY, "eval.generate.engine=transformers", "eval.generate.max_prompts=4",
                     "eval.generate.num_samples=2", "eval.generate.max_new_tokens=40",
                     "eval.checkpoints=[final]", cwd=tmp_path, cache=lmalign_cache, check=True,
                     env={"LMALIGN_TEST_MARK": marker, "OPENAI_API_KEY": os.environ.get(
                         "OPENAI_API_KEY", "")})
    assert "starting the transformers server" in result.stdout + result.stderr
    (cell,) = (demo_copy / "eval" / "final").glob("generate-*")
    answers = _answers(cell)
    assert sorted((a["prompt_id"], a["sample"]) for a in answers) == sorted(
        (f"tiny-{i}", s) for i in range(4) for s in range(2))
    assert sum(a["finish_reason"] == "eos" for a in answers) >= 7
    assert all("<|end|>" not in a["answer"] for a in answers)  # the stop string is not kept
    assert '"engine": "transformers"' in (cell / "cell.json").read_text()
    assert marked_processes(marker) == []


@pytest.mark.slow
def test_two_processes_share_the_batches_and_answer_as_one_process_does(demo_copy, tmp_path,
                                                                        lmalign_cache):
    """engine=hf under hardware=cpu_ddp: each process answers every other batch of the batches
    one process makes (turn 2 after both processes' turn 1), so the answers are the same."""
    shutil.copytree(demo_copy, tmp_path / "runs" / "single")
    sampled = ("eval=generate", "eval.generate.prompts=mt_bench", "eval.generate.max_prompts=6",
               "eval.generate.max_new_tokens=24", "eval.generate.num_samples=2",
               "eval.generate.batch_size=4", "eval.checkpoints=[final]")
    lmalign("stage=eval", "run_name=demo", "hardware=cpu_ddp", *sampled, cwd=tmp_path,
            cache=lmalign_cache, check=True)
    lmalign("stage=eval", "run_name=single", *sampled, cwd=tmp_path, cache=lmalign_cache,
            check=True)
    (shared,) = (demo_copy / "eval" / "final").glob("generate-*")
    (single,) = (tmp_path / "runs" / "single" / "eval" / "final").glob("generate-*")
    assert shared.name == single.name  # the process count is not part of the cell
    assert _answers(shared) == _answers(single) and len(_answers(shared)) == 6 * 2 * 2
    record = json.loads((shared / "cell.json").read_text())
    assert set(record["answered_per_process"]) == {"0", "1"}, record["answered_per_process"]
    assert sum(record["answered_per_process"].values()) == 24

    # a checkpoint without a chat template is the user's one line, not a worker's crash
    (demo_copy / "final" / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((demo_copy / "final" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (demo_copy / "final" / "tokenizer_config.json").write_text(json.dumps(config))
    refused = lmalign("stage=eval", "run_name=demo", "hardware=cpu_ddp", *sampled[:-1],
                      "eval.generate.max_prompts=2", "eval.checkpoints=[final]", cwd=tmp_path,
                      cache=lmalign_cache)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-1500:]
    assert "final's tokenizer has no chat template" in errors[0]
