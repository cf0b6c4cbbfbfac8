"""Each guard on config combinations: one line naming key, value and fix."""

from __future__ import annotations

import pytest

from conftest import typed_config
from lmalign.errors import UserError


def test_dpo_refuses_prompt_tuning():
    with pytest.raises(UserError, match=r"method.peft='prompt_tuning': DPO trains the full model "
                       r"or a LoRA adapter.*fix: method.peft=lora"):
        typed_config("method=dpo", "dataset=tiny_prefs", "method.peft=prompt_tuning")


def test_quantized_weights_train_only_through_lora():
    with pytest.raises(UserError, match=r"model.quantization='4bit': quantized weights cannot be "
                       r"trained directly \(method.peft=none\).*fix: method=lora"):
        typed_config("model.quantization=4bit")


def test_padding_free_without_flash_attention_is_refused():
    with pytest.raises(UserError, match=r"method.padding_free=True: .*with sdpa they attend to "
                       r"each other.*fix: .*method.padding_free=false"):
        typed_config("method.padding_free=true")


def test_bfd_packing_without_flash_attention_is_refused_but_wrapped_packing_runs():
    with pytest.raises(UserError, match=r"method.packing_strategy='bfd': .*fix: .*"
                       r"method.packing_strategy=wrapped"):
        typed_config("method.packing=true")
    assert typed_config("method.packing=true", "method.packing_strategy=wrapped").method.packing


def test_unknown_peft_kind_lists_the_allowed_ones():
    with pytest.raises(UserError, match=r"method.peft='ia3'.*one of none, lora, prompt_tuning"):
        typed_config("method.peft=ia3")


def test_fewshot_turns_without_the_chat_template_are_refused():
    with pytest.raises(UserError, match=r"eval.harness.fewshot_as_multiturn=True: few-shot turns need the "
                       r"chat template.*fix: eval.harness.fewshot_as_multiturn=null"):
        typed_config("eval.harness.apply_chat_template=false", "eval.harness.fewshot_as_multiturn=true")
    assert typed_config().eval.harness.multiturn  # null follows the chat template, as lm-eval does
    assert not typed_config("eval.harness.apply_chat_template=false").eval.harness.multiturn


def test_watch_needs_a_run_and_report_a_directory():
    with pytest.raises(UserError, match=r"run_name=None: stage=watch watches a training run"):
        typed_config("stage=watch")
    with pytest.raises(UserError, match=r"report.dir=None: stage=report needs a directory"):
        typed_config("stage=report")


def test_revisions_belong_to_a_hub_model_evaluation():
    with pytest.raises(UserError, match=r"eval.revisions=\['step-1'\]: revisions are versions of "
                       r"a hub model.*\(here stage=train_eval, model=tiny\)"):
        typed_config("eval.revisions=[step-1]")


def test_cache_stages_need_the_cache_directory():
    with pytest.raises(UserError, match=r"cache.dir=None: stage=cache_prepare needs the cache "
                       r"directory.*fix: stage=cache_prepare cache.dir="):
        typed_config("stage=cache_prepare")


def test_prepare_is_refused_offline():
    with pytest.raises(UserError, match=r"offline=True: stage=cache_prepare fetches from the hub"
                       r".*fix: drop offline=true"):
        typed_config("stage=cache_prepare", "offline=true", "cache.dir=/tmp/c")


def _bounded_keys():
    """(key, a value outside its bounds, the overrides that select its section) for every
    number in the schema that has bounds."""
    import typing

    from lmalign.type_errors import _bounds

    found = []
    for key, hint, needs in _typed_keys():
        members = [hint] + [a for a in typing.get_args(hint) if a is not type(None)]
        for symbol, limit in next((_bounds(m) for m in members if _bounds(m)), []):
            outside = {">=": limit - 1, ">": limit, "<=": limit + 1, "<": limit}[symbol]
            found.append((key, outside, needs))
    return found


def test_every_bounded_number_out_of_bounds_is_one_error_line_naming_the_bound(tmp_path,
                                                                              lmalign_cache):
    """Through the CLI entry in this process: exit 2, one `error:` line naming the key and
    what is allowed, nothing written."""
    from conftest import lmalign_in_process

    cases = _bounded_keys()
    assert len(cases) >= 30  # the schema's bounds, found by walking it
    for key, value, needs in cases:
        result = lmalign_in_process(*needs, f"{key}={value}", "dry_run=true", cwd=tmp_path,
                                    cache=lmalign_cache)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (key, value, result.stderr)
        assert lines[0].startswith(f"error: {key}={value}: not valid") and "allowed: " in lines[0]
        assert any(s in lines[0].split("allowed: ")[1] for s in (">", "<")), lines[0]
    assert not list(tmp_path.iterdir())


def test_max_steps_is_minus_one_or_a_number_of_steps():
    for steps in (0, -5):
        with pytest.raises(UserError, match=rf"method.max_steps={steps}: neither a number of steps"
                                            r" nor -1; allowed: -1 \(train for"):
            typed_config(f"method.max_steps={steps}")


def test_a_max_length_beyond_the_model_context_is_refused():
    with pytest.raises(UserError, match=r"method.max_length=1000: longer than model=tiny's "
                                        r"context of 256 positions"):
        typed_config("method.max_length=1000")


def test_a_single_task_is_a_list_of_one_and_a_stage_typo_gets_the_closest_stage():
    assert typed_config("eval.harness.tasks=tiny_mc").eval.harness.tasks == ["tiny_mc"]
    with pytest.raises(UserError, match=r"stage='evaluate': .*; fix: stage=eval$"):
        typed_config("stage=evaluate")


def _typed_keys():
    """(key, annotation, the overrides that select its section) for every leaf of the schema."""
    import dataclasses
    import typing

    from lmalign.schema import Config, DPOConfig, NemoConfig
    from lmalign.type_errors import _plain

    selects = {NemoConfig: ("eval=nemo",), DPOConfig: ("method=dpo", "dataset=tiny_prefs")}

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


def test_every_wrong_choice_and_every_word_for_a_number_is_one_line_with_a_fix(tmp_path,
                                                                               lmalign_cache):
    """The generated corpus: a value outside every fixed choice, and a word where every number
    goes, each through the CLI entry in this process: one `error:` line, exit 2, no traceback."""
    import typing

    from conftest import lmalign_in_process
    from lmalign.type_errors import _plain

    cases = []
    for key, hint, needs in _typed_keys():
        plain = _plain(hint)
        members = [_plain(m) for m in (plain, *typing.get_args(plain))]
        if any(typing.get_origin(m) is typing.Literal for m in members):
            cases.append((key, "bogus", needs, "allowed: one of "))
        elif any(m in (int, float) for m in members) and str not in members:
            cases.append((key, "abc", needs, "allowed: a"))
    assert len(cases) >= 50
    for key, value, needs, allowed in cases:
        result = lmalign_in_process(*needs, f"{key}={value}", "dry_run=true", cwd=tmp_path,
                                    cache=lmalign_cache)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (key, result.stderr)
        assert lines[0].startswith(f"error: {key}='{value}': not valid"), lines[0]
        assert allowed in lines[0] and "; fix: " in lines[0] and "Traceback" not in lines[0]
    assert not list(tmp_path.iterdir())
