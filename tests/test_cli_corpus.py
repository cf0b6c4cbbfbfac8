"""The generated corpus of mistaken overrides, a few hundred, each through the CLI entry in this
process (conftest.lmalign_in_process): exit 2, one `error:` line per mistake naming its key
and a fix, no traceback, nothing written. Mistakes of one kind in one section go in one command,
as a user's several mistakes do: every one must be reported, each once.
(Malformed data files: tests/test_data_preflight.py.)"""

from __future__ import annotations

import typing

import pytest

from conftest import lmalign_in_process


def _typed_keys():
    """(key, annotation, the overrides that select its section) for every leaf of the schema."""
    import dataclasses

    from lmalign.schema import (Config, DPOConfig, GenerateConfig, GRPOSettings, JudgeEvalConfig,
                                KTOSettings, NemoConfig, RewardEvalConfig, RewardSettings,
                                RLOOSettings)
    from lmalign.type_errors import _plain

    selects = {NemoConfig: ("eval=nemo",), GenerateConfig: ("eval=generate",),
               JudgeEvalConfig: ("eval=[generate,judge]", "eval.judge.api_key_env=null",
                                 "eval.judge.base_url=http://127.0.0.1:9/v1"),
               DPOConfig: ("method=dpo", "dataset=tiny_prefs"),
               RewardSettings: ("method=reward", "dataset=tiny_prefs", "eval=reward"),
               RewardEvalConfig: ("method=reward", "dataset=tiny_prefs", "eval=reward"),
               GRPOSettings: ("method=grpo", "dataset=tiny_prompts"),
               RLOOSettings: ("method=rloo", "dataset=tiny_prompts"),
               KTOSettings: ("method=kto", "dataset=tiny_unpaired")}

    def walk(cls, prefix, needs):
        for field in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls, include_extras=True)[field.name]
            members = [hint] + [a for a in typing.get_args(hint) if a is not type(None)]
            inner = next((m for m in members if isinstance(_plain(m), type)
                          and dataclasses.is_dataclass(_plain(m))), None)
            if inner is not None:
                sub = _plain(inner)
                yield from walk(sub, f"{prefix}{field.name}.", needs + selects.get(sub, ()))
            elif not field.name.startswith("_"):
                yield f"{prefix}{field.name}", hint, needs

    return list(walk(Config, "", ()))


def _wrong_values():
    """(needs, override, what its line starts with, what it must say) for every fixed choice
    (a value outside it), every number (a word; a value past each bound)."""
    from lmalign.type_errors import _bounds, _plain

    cases = []
    for key, hint, needs in _typed_keys():
        plain = _plain(hint)
        members = [_plain(m) for m in (plain, *typing.get_args(plain))]
        if any(typing.get_origin(m) is typing.Literal for m in members):
            cases.append((needs, f"{key}=bogus", f"error: {key}='bogus': not valid",
                          "allowed: one of "))
        elif any(m in (int, float) for m in members) and str not in members:
            cases.append((needs, f"{key}=abc", f"error: {key}='abc': not valid", "allowed: a"))
        bounded = [hint] + [a for a in typing.get_args(hint) if a is not type(None)]
        for symbol, limit in next((_bounds(m) for m in bounded if _bounds(m)), []):
            outside = {">=": limit - 1, ">": limit, "<=": limit + 1, "<": limit}[symbol]
            cases.append((needs, f"{key}={outside}", f"error: {key}={outside}: not valid",
                          "allowed: "))
    return cases


def _swapped(leaf: str) -> str:
    wrong = leaf[:-2] + leaf[-1] + leaf[-2] if len(leaf) > 2 else leaf + "x"
    return wrong if wrong != leaf else leaf[:-1]


def _dropped(leaf: str) -> str:
    return leaf[:len(leaf) // 2] + leaf[len(leaf) // 2 + 1:] if len(leaf) > 3 else leaf + "s"


def _misspelt_keys():
    """Every key of the schema with its last letters swapped, and with a letter left out."""
    cases = []
    for misspell in (_swapped, _dropped):
        for key, _, needs in _typed_keys():
            head, _, leaf = key.rpartition(".")
            wrong = (head + "." if head else "") + misspell(leaf)
            # The fix names the key (beside another as close: method.reward or method.rewards).
            cases.append((needs, f"{wrong}=1", f"error: {wrong}=1: no such key",
                          (f" {key}?", f" {key} or ")))
    return cases


def _wrong_group_options():
    """A near miss of a real option in every config group, all in one command."""
    from lmalign.config_tree import group_options

    cases = []
    for group in ("model", "dataset", "method", "hardware", "eval", "logger", "hydra/launcher"):
        option = [o for o in group_options(group) if o != "none"][0]
        cases.append(((), f"{group}={option}x", f"error: {group}={option}x: no such option in "
                      f"group '{group}'", f"fix: {group}={option}"))
    cases.append(((), "+experiment=method_comparisn",
                  "error: experiment=method_comparisn: no such option",
                  "fix: experiment=method_comparison"))
    return cases


# Mistakes of the command line's own syntax: (override, line start, what the fix says).
SYNTAX = [
    ("eval.nemo.nemo_args=[++max_samples=4]", "error: could not parse override",
     "fix: quote the value, eval.nemo.nemo_args=['++max_samples=4']"),
    ("method.learning_rate", "error: could not parse override 'method.learning_rate'",
     "fix: quote the value"),
    ("method.learning_rate=(1e-3)", "error: could not parse override", "fix: quote the value"),
    ("run_name=a=b", "error: could not parse override", "fix: quote the value, run_name='a=b'"),
    ("eval.harness.tasks=[tiny_mc", "error: could not parse override", "fix: quote the value"),
    ("model={name:x", "error: could not parse override", "fix: quote the value"),
]
REMOVED = [("~model", "error: ~model: removes model", "fix: drop ~model"),
           ("~stage", "error: ~stage: removes stage", "fix: drop ~stage"),
           ("~method.learning_rate", "error: ~method.learning_rate: removes", "fix: drop"),
           ("~hardware", "error: ~hardware: removes hardware", "fix: drop ~hardware"),
           ("~eval.seed", "error: ~eval.seed: removes eval.seed", "fix: drop ~eval.seed")]
# One command each: (arguments, each line's start and what it says).
COMMANDS = [
    (("method.learning_rate=1e-3,2e-3",),
     [("error: method.learning_rate=1e-3,2e-3: several values", "fix: -m method.learning_rate=")]),
    (("eval.harness.num_fewshot=0,5",),
     [("error: eval.harness.num_fewshot=0,5: several values", "eval.harness.num_fewshot=[0,5]")]),
    (("-m", "method.learning_rate=1e-3,abc,-1"),
     [("error: method.learning_rate='abc'", "allowed: a number > 0"),
      ("error: method.learning_rate=-1", "allowed: a number > 0")]),
    (("-m", "model=tiny,tinyy"), [("error: model=tinyy: no such option", "fix: model=tiny")]),
    (("-m", "seed=1,2", "method.warmup_ratio=3"),  # shared by both jobs: reported once
     [("error: method.warmup_ratio=3", "fix: method.warmup_ratio=1")]),
    (("-m", "eval.harness.num_fewshot=0,x"),
     [("error: eval.harness.num_fewshot='x'", "allowed: an integer >= 0")]),
    (("-m", "run_name=same", "seed=1,2"),
     [("error: run_name='same': sweep job 1", "run_name=exp_${hydra:job.num}")]),
    (("experiment=method_comparison",),
     [("error: experiment=method_comparison: no such key", "fix: +experiment=method_comparison")]),
    (("method.lora_r=8",), [("error: method.lora_r=8: no such key", "did you mean method.lora.r?")]),
    (("eval.tasks=[tiny_mc]",), [("error: eval.tasks=[tiny_mc]: no such key",
                                  "fix: eval.harness.tasks=[tiny_mc]")]),
    (("stage=evaluate",), [("error: stage='evaluate'", "fix: stage=eval")]),
]


def _grouped(cases):
    """Commands of one section each: the overrides that select it, then its mistakes, each key
    once per command (a later value of a key replaces an earlier one)."""
    commands: dict[tuple, list[list]] = {}
    for needs, override, start, says in cases:
        key = override.split("=", 1)[0]
        rounds = commands.setdefault(needs, [])
        free = next((r for r in rounds if key not in {o.split("=", 1)[0] for o, _, _ in r}),
                    None)
        if free is None:
            free = []
            rounds.append(free)
        free.append((override, start, says))
    return [(needs + tuple(o for o, _, _ in group), [(s, says) for _, s, says in group])
            for needs, rounds in commands.items() for group in rounds]


@pytest.mark.slow  # every mistake of the corpus through the CLI: about 20 s
def test_every_mistake_of_the_corpus_is_its_own_error_line_with_a_fix(tmp_path, lmalign_cache):
    commands = (_grouped(_wrong_values()) + _grouped(_misspelt_keys())
                + _grouped(_wrong_group_options())
                + [((o,), [(start, says)]) for o, start, says in SYNTAX]
                + [(tuple(o for o, _, _ in REMOVED), [(s, says) for _, s, says in REMOVED])]
                + COMMANDS)
    mistakes = sum(len(expected) for _, expected in commands)
    assert mistakes >= 350, mistakes
    wrong = []
    for arguments, expected in commands:
        result = lmalign_in_process(*arguments, "dry_run=true", cwd=tmp_path, cache=lmalign_cache)
        lines = result.stderr.strip().splitlines()
        if result.returncode != 2 or "Traceback" in result.stdout + result.stderr \
                or len(lines) != len(expected) or not all(l.startswith("error: ") for l in lines):
            wrong.append((arguments, result.returncode, lines[:5]))
            continue
        for start, says in expected:
            mine = [line for line in lines if line.startswith(start)]
            alternatives = says if isinstance(says, tuple) else (says,)
            if len(mine) != 1 or not any(a in mine[0] for a in alternatives) \
                    or "; fix: " not in mine[0]:
                wrong.append((start, says, mine))
    assert not wrong, wrong
    assert not list(tmp_path.iterdir())  # refused before anything was written
