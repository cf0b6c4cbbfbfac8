"""Magpie-style instructions (synth=magpie): the pre-query text an instruct model is given so
that it writes a user turn itself.

The pre-query text is derived from the generator's own chat template: a conversation of one
user message holding a sentinel is rendered, and everything before the sentinel is what the
generator sees; what follows it, up to the next role, ends a user turn (generation stops
there). A template that inserts a default system turn keeps it: Qwen2.5's ("You are Qwen,
created by Alibaba Cloud...") is part of every conversation the model was tuned on.

Llama-3.1's template inserts a dated system turn ("Cutting Knowledge Date: December 2023 /
Today Date: 26 Jul 2024") into every conversation, even one without a system message. Magpie's
published pre-query for Llama-3.1 omits it (it carried over Llama-3's, whose template has
none). lmalign keeps what the template renders: the model was tuned on conversations that
start with that turn, the responses are sampled under the same template, and no model gets an
exception of ours. `synth.pre_query_template` gives Magpie's exact text where a user wants to
reproduce its datasets. Templates that would insert today's date (Llama-3.2's strftime_now)
get Llama-3.1's fixed one, so a re-run renders the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmalign.errors import UserError, problem

SENTINEL = "\x00LMALIGN-USER-TURN\x00"
FIXED_DATE = "26 Jul 2024"  # Llama-3.1's own default date_string


@dataclass(frozen=True)
class PreQuery:
    text: str  # what the generator is given: the template up to where a user message begins
    end_of_turn: str  # what ends a user turn in this template: generation stops there


def pre_query(chat_template: str | None, bos_token: str = "", eos_token: str = "",
              override: str | None = None) -> PreQuery:
    """The pre-query text and end-of-turn marker of a chat template; `override`
    (synth.pre_query_template) replaces the derived text, never the end-of-turn marker."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    if not chat_template:
        raise UserError(problem(
            "synth.generator", None, "the generator's tokenizer has no chat template, so there "
            "is no user turn to begin", "an instruct model with a chat template",
            "model.chat_template_path=<template.jinja>, or synth.pre_query_template=<text>"))
    try:
        rendered, _ = render_jinja_template(
            [[{"role": "user", "content": SENTINEL}]], chat_template=chat_template,
            bos_token=bos_token, eos_token=eos_token, date_string=FIXED_DATE)
    except (TemplateError, TypeError, ValueError) as exc:
        raise UserError(problem(
            "synth.pre_query_template", None, f"the chat template does not render one user "
            f"message ({type(exc).__name__}: {exc})", "a template that renders a "
            "conversation of one user message, or the pre-query text itself",
            "synth.pre_query_template='<the text before a user message>'")) from None
    text = rendered[0]
    if text.count(SENTINEL) != 1:
        raise UserError(problem(
            "synth.pre_query_template", None, "the chat template does not show a user "
            "message's text once", "a template that renders the user's message as given",
            "synth.pre_query_template='<the text before a user message>'"))
    before, after = text.split(SENTINEL)
    return PreQuery(before if override is None else override, after.strip() or eos_token)
