"""Reward functions on fixed inputs (malformed ones included), their assembly from method.rewards,
and the refusals of a bad reward configuration."""

from __future__ import annotations

import json

import pytest

from conftest import shared_path, typed_config
from lmalign import rewards
from lmalign.errors import UserError

MALFORMED = ["", "   ", "no answer here", "9" * 5000, "∑∂ 答案是 ７２", "\x00\x01", "#### ",
             "\\boxed{", "1e309", "72" * 3000 + " #### 72.0.0", None]


def _as_chat(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


@pytest.mark.parametrize("function, settings", [
    (rewards.tiny_task, {"answer": ["7"] * len(MALFORMED)}),
    (rewards.gsm8k_answer, {"answer": ["#### 72"] * len(MALFORMED)}),
    (rewards.format_match, {"pattern": r"\d"}),
    (rewards.length_penalty, {"max_tokens": 8}),
])
def test_every_reward_scores_malformed_completions_with_a_number(function, settings):
    for completions in (MALFORMED, _as_chat(MALFORMED)):
        scores = function(completions, **settings)
        assert len(scores) == len(MALFORMED)
        assert all(isinstance(s, float) and s == s for s in scores)


def test_tiny_task_wants_the_reply_the_question_asks_for():
    assert rewards.tiny_task(_as_chat(["7", " 7\n", "The largest is 7.", "8"]),
                             answer=["7", "7", "7", "7"]) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.tiny_task(["The largest is 7."], answer=["The largest is 7."]) == [1.0]


def test_gsm8k_answer_reads_the_final_number_in_any_common_form():
    forms = ["#### 1234", "So she pays $1,234.", "The final answer is 1234.00", "\\boxed{1234}",
             "5 + 7 = 12, and 1234", "It is 1233.", "1234 apples, then 3 pears"]
    assert rewards.gsm8k_answer(forms, answer=["Steps 12 and 7.\n#### 1,234"] * len(forms)) \
        == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert rewards.gsm8k_answer(["72"], answer=["72"], answer_marker=None) == [1.0]


def test_gsm8k_reference_solutions_earn_the_reward():
    path = shared_path("data", "gsm8k", "test.jsonl")
    references = [json.loads(line)["answer"] for line in path.read_text().splitlines()]
    assert len(references) == 1319
    scores = rewards.gsm8k_answer(references, answer=references)
    assert sum(scores) / len(scores) >= 0.99


def test_format_match_and_length_penalty():
    assert rewards.format_match(["7", "The 7", " 7 "], pattern=r"\d") == [1.0, 0.0, 1.0]
    assert rewards.length_penalty(["a"] * 3, completion_ids=[[0] * 4, [0] * 6, [0] * 20],
                                  max_tokens=8) == [0.0, -0.5, -1.0]


def test_rewards_are_built_named_by_their_keys_with_their_weights_and_settings():
    functions, weights = rewards.build({
        "digit": {"_target_": "lmalign.rewards.format_match", "weight": 0.5, "pattern": r"\d"},
        "overlong": {"_target_": "trl.rewards.get_soft_overlong_punishment", "weight": 2,
                     "max_completion_len": 10, "soft_punish_cache": 5},
    })
    assert [f.__name__ for f in functions] == ["digit", "overlong"] and weights == [0.5, 2.0]
    assert functions[0](["7", "x"]) == [1.0, 0.0]
    assert functions[1](completion_ids=[[0] * 3, [0] * 10]) == [0.0, -1.0]


def test_the_default_grpo_reward_can_be_switched_off_and_replaced_from_the_command_line():
    config = typed_config("method=grpo", "dataset=tiny_prompts", "method.rewards.tiny=null",
                          "+method.rewards.digit={_target_: lmalign.rewards.format_match, "
                          "weight: 1.0, pattern: '\\d'}")
    assert list(config.method.active_rewards) == ["digit"]


def _refusal(*overrides: str) -> list[str]:
    with pytest.raises(UserError) as caught:
        typed_config("method=grpo", "dataset=tiny_prompts", *overrides)
    return caught.value.problems


def test_bad_reward_settings_are_refused_one_line_each():
    lines = _refusal("method.rewards.tiny._target_=lmalign.rewards.no_such_reward",
                     "+method.rewards.fmt={_target_: lmalign.rewards.format_match}",
                     "+method.rewards.long={_target_: lmalign.rewards.length_penalty, "
                     "weight: heavy, max_tokns: 3}")
    text = "\n".join(lines)
    assert "method.rewards.tiny._target_='lmalign.rewards.no_such_reward': lmalign.rewards has " \
        "no function no_such_reward" in text
    assert "method.rewards.long.weight='heavy': not a number" in text
    assert "method.rewards.long.max_tokns=3: lmalign.rewards.length_penalty takes no setting " \
        "'max_tokns'" in text
    assert len(lines) == 3, text  # format_match's missing pattern: checked against the data


def test_reward_setting_values_are_checked_against_their_types_before_anything_loads():
    text = "\n".join(lines := _refusal(
        "+method.rewards.fmt={_target_: lmalign.rewards.format_match, pattern: '(ab'}",
        "+method.rewards.long={_target_: lmalign.rewards.length_penalty, max_tokens: 0}",
        "+method.rewards.rm={_target_: lmalign.rewards.reward_model, model: rm, "
        "input_style: chatt}",
        "+method.rewards.over={_target_: trl.rewards.get_soft_overlong_punishment, "
        "max_completion_len: eight, soft_punish_cache: 2}"))
    assert "method.rewards.fmt.pattern='(ab': not a value format_match takes for pattern; " \
        "allowed: a regular expression (Python's re): missing )" in text
    assert "method.rewards.long.max_tokens=0: not a value length_penalty takes for max_tokens; " \
        "allowed: greater than 0" in text
    assert "method.rewards.rm.input_style='chatt': not a value reward_model takes for " \
        "input_style; allowed: 'chat', 'pair' or 'auto'" in text
    assert "method.rewards.over.max_completion_len='eight'" in text  # TRL's annotations too
    assert len(lines) == 4, text


def test_a_reward_input_neither_set_nor_in_the_data_is_refused_before_training():
    spec = {"_target_": "lmalign.rewards.format_match"}
    with pytest.raises(UserError, match=r"method.rewards.fmt='lmalign.rewards.format_match': "
                       r"needs the input 'pattern'.*fix: \+method.rewards.fmt.pattern=<value>"):
        rewards.build({"fmt": spec}, columns=["prompt", "answer"])
    with pytest.raises(UserError, match=r"needs the input 'answer'.*\+dataset.columns.answer="):
        rewards.build({"tiny": {"_target_": "lmalign.rewards.tiny_task"}}, columns=["prompt"])


def test_a_factory_missing_a_setting_and_an_unimportable_module_are_refused():
    text = "\n".join(_refusal(
        "+method.rewards.over={_target_: trl.rewards.get_soft_overlong_punishment, "
        "max_completion_len: 8}",
        "method.rewards.tiny._target_=nowhere_pkg.reward"))
    assert "method.rewards.over.soft_punish_cache=None: trl.rewards.get_soft_overlong_punishment " \
        "makes a reward from settings and needs this one" in text
    assert "method.rewards.tiny._target_='nowhere_pkg.reward': cannot import nowhere_pkg" in text


def test_grpo_needs_prompts_whole_groups_and_a_reward():
    text = "\n".join(_refusal("dataset=tiny_sft", "method.global_batch_size=60",
                              "method.rewards.tiny=null"))
    assert "dataset='tiny_sft': method=grpo generates its own completions from prompts" in text
    assert "method.global_batch_size=60: counts completions, which come in groups of " \
        "method.grpo.num_generations=8" in text and "fix: method.global_batch_size=56" in text
    assert "method.rewards=" in text and "needs at least one reward" in text
    with pytest.raises(UserError, match="prompts alone are for method=grpo"):
        typed_config("dataset=tiny_prompts")
