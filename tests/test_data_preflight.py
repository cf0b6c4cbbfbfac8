"""Malformed training data is refused before any model loads: one `error:` line naming the
file, the line or row and the fix, exit 2, no traceback, nothing written. The corpus runs through
the CLI entry in this process (conftest.lmalign_in_process)."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import lmalign_in_process

CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# name -> (file name, contents, overrides beyond dataset=local, what the one error line says)
CORPUS = {
    "broken line": ("d.jsonl", _jsonl([CHAT] * 19) + '{"messages": [oops\n' + _jsonl([CHAT]),
                    (), "line 20, column 15: not JSON"),
    "broken first line": ("d.jsonl", "{\n" + _jsonl([CHAT]), (), "line 1, column 2: not JSON"),
    "broken last line, no newline": ("d.jsonl", _jsonl([CHAT] * 3) + '{"messages": 1',
                                     (), "line 4, column 15: not JSON"),
    "trailing comma in a JSON list": ("d.json", json.dumps([CHAT, CHAT])[:-1] + ",]", (),
                                      "line 1, column"),
    "empty jsonl": ("d.jsonl", "", (), "the file is empty"),
    "blank jsonl": ("d.jsonl", "\n \n\n", (), "the file is empty"),
    "empty json": ("d.json", "", (), "the file is empty"),
    "a JSON number": ("d.json", "42", (), "row 1 is 42, not an object of columns"),
    "a line that is a list": ("d.jsonl", _jsonl([CHAT]) + "[1, 2]\n", (),
                              "line 2 is [1, 2], not an object of columns"),
    "empty csv": ("d.csv", "", (), "the file is empty"),
    "unknown type": ("d.txt", "hello", (), "unknown file type"),
    "sharegpt turns": ("d.jsonl", _jsonl([{"messages": [{"from": "human", "value": "hi"},
                                                        {"from": "gpt", "value": "yo"}]}] * 3),
                       (), "row 1 (and 2 more of 3): turns use ShareGPT's from/value keys"),
    "no assistant turn": ("d.jsonl", _jsonl([{"messages": [{"role": "user", "content": "hi"}]}]),
                          (), "row 1 of 1: no assistant turn"),
    "one row of many without an answer": (
        "d.jsonl", _jsonl([CHAT] * 5 + [{"messages": [{"role": "user", "content": "x"}]}]),
        (), "row 6 of 6: no assistant turn"),
    "unknown role": ("d.jsonl", _jsonl([{"messages": [{"role": "human", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}]),
                     (), "unknown role human"),
    "turn without content": ("d.jsonl", _jsonl([{"messages": [{"role": "user"},
                                                              {"role": "assistant",
                                                               "content": "yo"}]}]),
                             (), "a turn lacks role or content"),
    "messages not a list": ("d.jsonl", _jsonl([{"messages": "hello"}]), (),
                            "its messages are not a list of turns"),
    "prompt/completion data as messages": (
        "d.jsonl", _jsonl([{"prompt": "a", "completion": "b"}]), (),
        "fix: dataset.format=prompt_completion"),
    "empty completion": ("d.jsonl", _jsonl([{"prompt": "a", "completion": ""}]),
                         ("dataset.format=prompt_completion",), "an empty completion"),
    "empty text": ("d.jsonl", _jsonl([{"text": " "}]), ("dataset.format=text",), "empty text"),
    "no column of the format": ("d.jsonl", _jsonl([{"question": "a", "answer": "b"}]), (),
                                "column 'messages' not found"),
    "where keeps nothing": ("d.jsonl", _jsonl([{**CHAT, "lang": "en"}]),
                            ("+dataset.where.lang=fr",), "no rows to train on"),
    "where on a missing column": ("d.jsonl", _jsonl([CHAT]), ("+dataset.where.lang=fr",),
                                  "column 'lang' not found"),
    "rows that are not objects": ("d.json", "[1, 2, 3]", (), "row 1 is 1, not an object"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, lmalign_cache):
    """Every case of CORPUS refused: (name, its result, its working directory)."""
    results = []
    for name, (file_name, text, overrides, _) in CORPUS.items():
        where = tmp_path_factory.mktemp("case")
        (where / file_name).write_text(text)
        results.append((name, lmalign_in_process(
            "dataset=local", f"dataset.path={file_name}", "eval=none", "method.max_steps=1",
            "run_name=r", *overrides, cwd=where, cache=lmalign_cache), where))
    return results


@pytest.mark.parametrize("name", list(CORPUS))
def test_malformed_data_is_one_error_line_before_anything_loads(corpus, name):
    _, result, where = next(case for case in corpus if case[0] == name)
    said = CORPUS[name][3]
    assert result.returncode == 2, (name, result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: dataset."), lines
    assert said in lines[0] and "; fix: " in lines[0], lines[0]
    assert not (where / "runs").exists()  # refused before anything was written
    assert "loading" not in result.stdout.lower()  # no model was loaded


def test_a_gzipped_jsonl_is_parsed_too(tmp_path, lmalign_cache):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as handle:
        handle.write(_jsonl([CHAT]) + "{broken\n")
    result = lmalign_in_process("dataset=local", "dataset.path=d.jsonl.gz", "eval=none",
                                cwd=tmp_path, cache=lmalign_cache)
    assert result.returncode == 2 and "line 2, column 2: not JSON" in result.stderr


def test_good_data_reports_its_row_counts_after_each_filter(tmp_path, lmalign_cache):
    from lmalign.data_preflight import preflight
    from conftest import typed_config

    (tmp_path / "d.jsonl").write_text(_jsonl([{**CHAT, "lang": "en"}] * 7
                                             + [{**CHAT, "lang": "fr"}] * 3))
    dataset = typed_config("dataset=local", f"dataset.path={tmp_path / 'd.jsonl'}",
                           "+dataset.where.lang=en", "dataset.max_samples=5").dataset
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("lmalign.data_preflight").addHandler(handler)
    logging.getLogger("lmalign.data_preflight").setLevel(logging.INFO)
    try:
        assert preflight(dataset) == []
    finally:
        logging.getLogger("lmalign.data_preflight").removeHandler(handler)
    (message,) = [r.getMessage() for r in records]
    assert "10 rows in" in message and "7 after dataset.where" in message
    assert "5 used (dataset.max_samples)" in message


def test_a_hub_dataset_is_checked_on_its_first_rows_streamed_from_the_hub(tmp_path, lmalign_cache):
    """Against the local hub stand-in (tests/hub_server.py): a chat row without an answer in
    the hub dataset's train split is one error line before any model is built."""
    import os
    import subprocess
    import sys

    from hub_server import HubServer, write_parquet_dataset_repo

    bad = {"messages": [{"role": "user", "content": "and then?"}]}
    write_parquet_dataset_repo(tmp_path / "hub" / "datasets" / "HuggingFaceTB" / "smoltalk", {
        "smol-magpie-ultra": {"train": [CHAT] * 6 + [bad] + [CHAT], "test": [CHAT]}})
    with HubServer(tmp_path / "hub") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "LMALIGN_CACHE": str(lmalign_cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None), env.pop("HF_DATASETS_OFFLINE", None)
        result = subprocess.run(
            [sys.executable, "-m", "lmalign", "dataset=smoltalk_magpie_ultra", "eval=none",
             "method.max_steps=1", "run_name=r"], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=300)
        streamed = [path for _, path in hub.requests if path.endswith(".parquet")]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: dataset."), lines
    assert "row 7 of 8: no assistant turn" in lines[0] and "; fix: " in lines[0], lines[0]
    assert any("smol-magpie-ultra/train" in path for path in streamed)  # read from the hub
    assert "loading" not in result.stdout.lower()  # no model was loaded
