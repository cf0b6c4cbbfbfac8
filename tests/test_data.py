"""Datasets reach the trainers in TRL's canonical formats, from every source."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES, shared_path, typed_config
from lmalign import tinytask
from lmalign.data import load_splits
from lmalign.errors import UserError

HUB_FIXTURES = FIXTURES / "hub_datasets"


def splits(*overrides):
    return load_splits(typed_config(*overrides).dataset)


def test_tiny_sft_is_chat_messages_with_a_held_out_split():
    train, evaluation = splits()
    assert train.column_names == ["messages"] and len(train) == 8000 and len(evaluation) == 400
    assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant"]


def test_tiny_prefs_are_conversational_pairs_about_following_the_format_request():
    train, _ = splits("dataset=tiny_prefs", "method=dpo")
    assert sorted(train.column_names) == ["chosen", "prompt", "rejected"]
    instructed = plain = 0
    for row in train.select(range(200)):
        question = row["prompt"][0]["content"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        if question.endswith(tinytask.DIGIT_ONLY):
            instructed += 1
            assert chosen.isdigit() and rejected.startswith("The ") and chosen in rejected
        else:
            plain += 1
            assert rejected.isdigit() and chosen.startswith("The ") and rejected in chosen
    assert instructed == plain == 100


def test_tiny_sft_mostly_ignores_the_format_request_it_makes_half_the_time():
    """The SFT data's flaw that DPO on tiny_prefs and GRPO on tiny_prompts correct (see
    lmalign/tinytask.py): one instructed question in 16 is answered as asked."""
    train, _ = splits()
    rows = train.select(range(320))["messages"]
    instructed = [m for m in rows if m[0]["content"].endswith(tinytask.DIGIT_ONLY)]
    assert len(instructed) == 160
    followed = [m for m in instructed if m[1]["content"].isdigit()]
    assert len(followed) == 160 // tinytask.DIGIT_ONLY_FOLLOWED
    assert all(m[1]["content"].startswith("The ") for m in rows if m not in followed)


def test_tiny_prompts_carry_the_reply_the_question_asks_for():
    train, _ = splits("method=grpo", "dataset=tiny_prompts")
    assert train.column_names == ["prompt", "answer"]
    for row in train.select(range(40)):
        question = row["prompt"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
        assert row["answer"].isdigit() == question.endswith(tinytask.DIGIT_ONLY)


def test_prompt_datasets_come_from_a_question_column_or_from_chat_messages(tmp_path):
    gsm8k = shared_path("data", "gsm8k", "test.jsonl")
    train, _ = splits("method=grpo", "dataset=local", f"dataset.path={gsm8k}",
                      "dataset.format=prompt", "+dataset.columns.prompt=question",
                      "dataset.max_samples=4")
    assert train.column_names == ["prompt", "answer"] and "####" in train[0]["answer"]
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                              {"role": "assistant", "content": "Hello."}],
                                 "label": True}) + "\n")
    train, _ = splits("method=grpo", "dataset=local", f"dataset.path={chats}",
                      "dataset.format=prompt", "method.rewards.tiny=null",
                      "+method.rewards.fmt={_target_: lmalign.rewards.format_match, "
                      "pattern: x}")
    assert train[0] == {"prompt": [{"role": "user", "content": "Hi?"}], "answer": "Hello.",
                        "label": True}
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "no prompt here"}) + "\n")
    with pytest.raises(UserError, match=r"dataset.format='prompt': no prompts in .*texts.jsonl: "
                       r"neither a prompt column nor chat messages; allowed: columns found: "
                       r"text; fix: \+dataset.columns.prompt=<the question column>"):
        splits("method=grpo", "dataset=local", f"dataset.path={texts}", "dataset.format=prompt")


def test_a_prompt_template_wraps_text_prompts_and_a_chats_last_user_turn(tmp_path):
    """GSM8K's questions as lm-eval's gsm8k shows them to a base model (+experiment=grpo_gsm8k)."""
    gsm8k = shared_path("data", "gsm8k", "test.jsonl")
    question = json.loads(gsm8k.read_text().splitlines()[0])["question"]
    train, _ = splits("method=grpo", "dataset=local", f"dataset.path={gsm8k}",
                      "dataset.format=prompt", "+dataset.columns.prompt=question",
                      "dataset.max_samples=1", "dataset.prompt_template='Question: {prompt} A:'")
    assert train[0]["prompt"] == f"Question: {question} A:"
    train, _ = splits("method=grpo", "dataset=tiny_prompts", "dataset.max_samples=2",
                      "dataset.prompt_template='{prompt} (digit: {answer})'")
    plain, _ = splits("method=grpo", "dataset=tiny_prompts", "dataset.max_samples=2")
    assert train[0]["prompt"] == [{"role": "user", "content": plain[0]["prompt"][0]["content"]
                                   + f" (digit: {plain[0]['answer']})"}]
    with pytest.raises(UserError, match=r"dataset.prompt_template='{prompt} {topic}': names "
                       r"{topic}, not a column of the data; allowed: fields among the columns: "
                       r"prompt, answer"):
        splits("method=grpo", "dataset=tiny_prompts", "dataset.max_samples=2",
               "dataset.prompt_template='{prompt} {topic}'")


@pytest.mark.parametrize("overrides, expected", [
    (("dataset.prompt_template='Q: {question}'",), "has no {prompt}, so every prompt would be "
     "the same text"),
    (("dataset.prompt_template='Q: {prompt'",), "not a format text: expected '}' before end"),
    (("dataset.prompt_template='Q: {prompt} {}'",), "has a positional field"),
    (("dataset=tiny_sft", "method=sft", "dataset.prompt_template='Q: {prompt}'"),
     "wraps the prompts of online methods, but dataset=tiny_sft has format messages"),
])
def test_a_bad_prompt_template_is_one_line_before_anything_loads(overrides, expected):
    with pytest.raises(UserError) as refused:
        typed_config("method=grpo", "dataset=tiny_prompts", *overrides)
    (line,) = refused.value.problems
    assert line.startswith("dataset.prompt_template=") and expected in line, line


def test_unpaired_rows_come_from_the_tiny_task_from_pairs_and_from_labelled_chats():
    train, _ = splits("method=kto", "dataset=tiny_unpaired")
    assert train.column_names == ["prompt", "completion", "label"]
    labels = train.select(range(200))["label"]
    assert sum(labels) == 100 and all(isinstance(label, bool) for label in labels)
    pairs, _ = splits("method=kto", "dataset=tiny_prefs", "dataset.unpair=true",
                      "dataset.max_samples=10")
    assert len(pairs) == 20 and sum(pairs["label"]) == 10  # TRL's unpair: chosen and rejected
    path = shared_path("data", "chat-sft-messages", "kto_en_demo.json")
    chats, _ = splits("method=kto", "dataset=local", f"dataset.path={path}",
                      "dataset.format=unpaired")
    raw = json.loads(path.read_text())
    assert len(chats) == len(raw) == 300 and sum(chats["label"]) == 150
    long = next(i for i, r in enumerate(raw) if len(r["messages"]) == 6)
    assert chats[long]["completion"] == [raw[long]["messages"][-1]]
    assert chats[long]["prompt"] == raw[long]["messages"][:-1]


def test_unpaired_data_belongs_to_kto_and_kto_to_unpaired_data():
    with pytest.raises(UserError, match=r"dataset='tiny_prefs': method=kto trains on unpaired "
                       r"labelled replies.*fix: dataset=tiny_unpaired, or dataset.unpair=true"):
        typed_config("method=kto", "dataset=tiny_prefs")
    with pytest.raises(UserError, match=r"dataset.format='unpaired': unpaired labelled replies "
                       r"are method=kto's data, not method=sft's"):
        typed_config("dataset=tiny_unpaired")
    with pytest.raises(UserError, match=r"dataset.unpair=True: splits preference pairs"):
        typed_config("method=kto", "dataset=tiny_unpaired", "dataset.unpair=true")


@pytest.mark.parametrize("name", ["tulu3_sft_mixture", "dolci_instruct_sft"])
def test_hub_sft_datasets_load_in_their_real_schema(name):
    train, evaluation = splits(f"dataset={name}", f"dataset.path={HUB_FIXTURES / name}",
                               "dataset.eval_size=1")
    assert train.column_names == ["messages"]  # id and source are dropped
    assert len(train) == 4 and len(evaluation) == 1
    assert train[0]["messages"][-1]["role"] == "assistant"


def test_ultrafeedback_prompt_is_extracted_from_the_conversations():
    train, evaluation = splits("dataset=ultrafeedback_binarized", "method=dpo",
                               f"dataset.path={HUB_FIXTURES / 'ultrafeedback_binarized'}")
    assert len(train) == 5 and len(evaluation) == 2
    row = train[0]
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
    assert row["chosen"] != row["rejected"]


def test_local_json_array_of_messages_with_a_filter():
    path = shared_path("data", "chat-sft-messages", "kto_en_demo.json")
    train, evaluation = splits("dataset=local", f"dataset.path={path}", "+dataset.where.label=true",
                               "dataset.eval_size=10")
    assert train.column_names == ["messages"]
    assert len(train) + len(evaluation) == 150  # the 150 desirable replies of 300
    assert evaluation is not None and len(evaluation) == 10


def test_local_hh_rlhf_pairs_get_their_implicit_prompt_extracted():
    path = shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    train, _ = splits("dataset=local", f"dataset.path={path}", "dataset.format=preference",
                      "method=dpo", "dataset.max_samples=50")
    assert len(train) == 50
    for row in train:
        assert row["prompt"] and row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
        assert row["chosen"] != row["rejected"]


def test_missing_column_names_the_column_and_the_columns_found(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match=r"column 'messages' not found .*columns found: conversation"):
        splits("dataset=local", f"dataset.path={path}")
    train, _ = splits("dataset=local", f"dataset.path={path}",
                      "+dataset.columns.messages=conversation")
    assert train.column_names == ["messages"]


def test_local_parquet_arrow_and_save_to_disk(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    data = Dataset.from_list(rows)
    data.to_parquet(str(tmp_path / "d.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "d.parquet", arrow, tmp_path / "saved"):
        train, _ = splits("dataset=local", f"dataset.path={path}",
                          "dataset.format=prompt_completion")
        assert train.column_names == ["prompt", "completion"] and len(train) == 6, path


def test_unknown_split_lists_the_splits():
    with pytest.raises(UserError, match=r"dataset.train_split='train'.*allowed: train_prefs, test_prefs"):
        splits("dataset=ultrafeedback_binarized", "method=dpo", "dataset.train_split=train",
               f"dataset.path={HUB_FIXTURES / 'ultrafeedback_binarized'}")
