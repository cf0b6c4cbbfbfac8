"""Magpie's pre-query text, derived from chat templates: the tiny model's and the ones TRL
ships for real models, pinned as the strings those models are given."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmalign.embedded import CHAT_TEMPLATE
from lmalign.errors import UserError
from lmalign.synthesis import magpie


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


LLAMA_SYSTEM = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")


@pytest.mark.parametrize("name, bos, text, end", [
    ("tiny", "", "<|user|>\n", "<|end|>"),
    # Qwen2.5 keeps the default system turn its template inserts
    ("qwen2_5", "", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
     "helpful assistant.<|im_end|>\n<|im_start|>user\n", "<|im_end|>"),
    ("qwen3", "", "<|im_start|>user\n", "<|im_end|>"),
    # Llama-3.1 keeps its dated system turn (the module's docstring says why)
    ("llama3_1", "<|begin_of_text|>", "<|begin_of_text|>" + LLAMA_SYSTEM +
     "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    # Llama-3.2 would insert today's date: it gets the fixed one, so re-runs match
    ("llama3_2", "<|begin_of_text|>", "<|begin_of_text|>" + LLAMA_SYSTEM +
     "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
])
def test_the_pre_query_is_the_template_up_to_a_user_message(name, bos, text, end):
    template = CHAT_TEMPLATE if name == "tiny" else _trl_template(name)
    found = magpie.pre_query(template, bos_token=bos, eos_token="</s>")
    assert found == magpie.PreQuery(text, end)


def test_an_override_gives_magpies_published_text_and_keeps_the_end_of_turn():
    magpies = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    found = magpie.pre_query(_trl_template("llama3_1"), "<|begin_of_text|>", override=magpies)
    assert found == magpie.PreQuery(magpies, "<|eot_id|>")


@pytest.mark.parametrize("template, says", [
    (None, "synth.generator=None: the generator's tokenizer has no chat template"),
    ("{{ raise_exception('system first') }}", "the chat template does not render one user "
     "message (TemplateError: system first)"),
    ("{{ 'no message here' }}", "does not show a user message's text once"),
])
def test_a_template_without_a_user_turn_is_one_line_naming_the_override(template, says):
    with pytest.raises(UserError) as refused:
        magpie.pre_query(template)
    (line,) = refused.value.problems
    assert says in line and "fix: " in line, line
