"""Reward functions for method=grpo and method=rloo, and their assembly from `method.rewards`.

A reward is what TRL's trainers call: `f(completions, **columns) -> list[float | None]`, one
number per completion, with the dataset's other columns (answer, ...) as keyword lists. The config
names each reward by a key, `{_target_, weight, ...settings}` (Hydra's way of naming code):

    method.rewards.correct: {_target_: lmalign.rewards.gsm8k_answer, weight: 1.0}

A target that takes `completions` is the reward and its settings are bound to it; any other
callable is a factory (TRL's `get_soft_overlong_punishment`) called with the settings to make the
reward; a factory with a `config` parameter also gets the run's typed config (reward_model loads
its model the way the run loads models). Every reward here returns a number for any completion (empty, huge, not ASCII), never
raises: a reward that raised would stop a training run hours in.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from typing import Annotated, Any, Callable, Literal

import pydantic

from lmalign.errors import UserError, problem
from lmalign.validate import required_parameters, takes_completions

RewardFunction = Callable[..., list]


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"a regular expression (Python's re): {exc}") from None
    return pattern


# Settings' types: validation checks each setting's value against them before anything loads.
Regex = Annotated[str, pydantic.AfterValidator(_compiles)]
PositiveInt = Annotated[int, pydantic.Field(gt=0)]


def text_of(completion: Any) -> str:
    """A completion as TRL hands it over: a string, or a conversation's messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return "" if completion is None else str(completion)


def tiny_task(completions: list, answer: list[str], **_: Any) -> list[float]:
    """The tiny task's reply exactly: the right digit, alone when the question asks for the
    digit only, else in the task's sentence (lmalign/tinytask.py). 1.0 or 0.0."""
    return [float(text_of(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def gsm8k_answer(completions: list, answer: list[str], answer_marker: str | None = "####",
                 **_: Any) -> list[float]:
    """1.0 where the completion's final number equals the reference's (math-verify decides
    equality: 1,234 = 1234 = 1234.0, \\boxed{} and "final answer is" understood).

    answer_marker: GSM8K's references end "#### 72" after worked steps full of other numbers;
    the reference's answer is what follows its last marker (null: the whole reference). A
    completion is read by math-verify's own extraction (boxed, "final answer is", else its last
    expression), so a model may answer in any of these forms.
    """
    import threading

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # math-verify bounds its sympy work with signal.alarm, which only the main thread may set
    # (TRL's accuracy_reward does the same); elsewhere it runs unbounded and would warn per call.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    scores = []
    with _quiet_math_verify(timeout is None):
        for completion, reference in zip(completions, answer):
            reference = str(reference)
            if answer_marker and answer_marker in reference:
                reference = reference.rpartition(answer_marker)[2]
            try:
                gold = parse(reference, extraction_config=[ExprExtractionConfig()],
                             extraction_mode="first_match", parsing_timeout=timeout)
                found = parse(text_of(completion), extraction_config=[
                    LatexExtractionConfig(), ExprExtractionConfig()],
                    extraction_mode="first_match", parsing_timeout=timeout)
                scores.append(float(bool(gold) and bool(found) and verify(
                    gold, found, timeout_seconds=timeout)))
            except Exception:  # math-verify on adversarial text: no credit, never a crash
                scores.append(0.0)
    return scores


@contextlib.contextmanager
def _quiet_math_verify(quiet: bool):
    """Without timeouts math-verify warns on every call: silenced while it runs, then restored."""
    import logging

    loggers = [logging.getLogger(f"math_verify.{name}") for name in ("parser", "grader")]
    levels = [logger.level for logger in loggers]
    if quiet:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def format_match(completions: list, pattern: Regex, **_: Any) -> list[float]:
    """1.0 where the whole completion (stripped) matches the regular expression `pattern`."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(text_of(c).strip()) is not None) for c in completions]


def length_penalty(completions: list, completion_ids: list | None = None,
                   max_tokens: PositiveInt = 256, **_: Any) -> list[float]:
    """0 for completions of up to half of max_tokens, falling linearly to -1 at max_tokens and
    beyond (tokens where the trainer gives ids, else characters / 4)."""
    penalties = []
    for index, completion in enumerate(completions):
        length = (len(completion_ids[index]) if completion_ids is not None
                  else len(text_of(completion)) / 4)
        free = max_tokens / 2
        penalties.append(-min(1.0, max(0.0, (length - free) / max(max_tokens - free, 1))))
    return penalties


def reward_model(model: str, config: Any, batch_size: PositiveInt = 16,
                 max_length: PositiveInt = 1024,
                 input_style: Literal["chat", "pair", "auto"] = "auto") -> RewardFunction:
    """A sequence-classification reward model's score of each (prompt, completion): a
    method=reward run (its run_name or directory), a model directory or a hub id.

    input_style: chat (the conversation through the reward model's chat template, as TRL's
    RewardTrainer trained it), pair ((question, answer), encoders without a template), or auto
    (chat when the model has a template). Loaded once, beside the policy, on its device.
    """
    from lmalign import models, scoring

    start = models.trained_start(model, config.runs_root) or models.Start(model, None,
                                                                          tokenizer=model)
    path = str(start.adapter or start.path)
    tokenizer = models.load_tokenizer(path, config.model, start.revision)
    loaded = models.load_trained(path, config.model, config.hardware, start.revision,
                                 head="reward")
    if config.hardware.accelerator == "cuda":
        loaded.to("cuda")
    style = scoring.input_style(tokenizer) if input_style == "auto" else input_style

    def score(prompts: list, completions: list, **_: Any) -> list[float]:
        items: list[scoring.Scored] = []
        for prompt, completion in zip(prompts, completions):
            turns = prompt if isinstance(prompt, list) else [{"role": "user",
                                                              "content": str(prompt)}]
            answer = text_of(completion)
            question = text_of([t for t in turns if t.get("role") == "user"][-1:])
            items.append(turns + [{"role": "assistant", "content": answer}]
                         if style == "chat" else (question, answer))
        return scoring.score(loaded, tokenizer, items, batch_size, max_length, "reward model",
                             progress=False)

    return score


# ---------------------------------------------------------------------------------------------
# From method.rewards to TRL's reward_funcs and reward_weights


# What TRL passes besides the dataset's columns.
TRAINER_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra",
                     "log_metric", "environments")


def build(rewards: dict[str, dict[str, Any]], columns: list[str] | None = None,
          config: Any = None) -> tuple[list[RewardFunction], list[float]]:
    """(reward functions named after their keys, their weights), in the config's key order.

    Imports and setting names were checked at validation; here, once the data is loaded, each
    reward's required inputs are checked against the dataset's columns (`columns`), so a reward
    that needs `answer` fails before the first generation, not at it."""
    from hydra.utils import get_method

    functions, weights, problems = [], [], []
    for name, spec in rewards.items():
        settings = {k: v for k, v in spec.items() if k not in ("_target_", "weight")}
        target = get_method(spec["_target_"])
        if columns is not None and takes_completions(target):
            problems += _missing_inputs(name, spec["_target_"], target, settings, columns)
        if not takes_completions(target) and "config" in inspect.signature(target).parameters:
            settings["config"] = config
        function = (functools.partial(target, **settings) if takes_completions(target)
                    else target(**settings))
        functions.append(_named(function, name))
        weights.append(float(spec.get("weight", 1.0)))
    if problems:
        raise UserError(problems)
    return functions, weights


def _missing_inputs(name: str, dotted: str, target: Callable, settings: dict,
                    columns: list[str]) -> list[str]:
    needed = [n for n in required_parameters(target)
              if n not in TRAINER_ARGUMENTS and n not in settings]
    return [problem(f"method.rewards.{name}", dotted, f"needs the input {n!r}: neither a "
                    f"setting of the reward nor a dataset column ({', '.join(columns)})",
                    f"a dataset with a {n!r} column, or the setting",
                    f"+dataset.columns.{n}=<a column>" if n == "answer"
                    else f"+method.rewards.{name}.{n}=<value>")
            for n in needed if n not in columns]


def _named(function: RewardFunction, name: str) -> RewardFunction:
    """TRL logs each reward under its function's __name__: the config's key here."""
    @functools.wraps(function, assigned=())
    def reward(*args: Any, **kwargs: Any) -> list:
        return function(*args, **kwargs)

    reward.__name__ = reward.__qualname__ = name
    return reward
