"""Each guard on config combinations: one line naming key, value and fix."""

from __future__ import annotations

import pytest

from conftest import typed_config
from lmalign.errors import UserError


def test_dpo_refuses_prompt_tuning():
    with pytest.raises(UserError, match=r"method.peft='prompt_tuning': method=dpo trains the full model "
                       r"or a LoRA adapter.*fix: method.peft=lora"):
        typed_config("method=dpo", "dataset=tiny_prefs", "method.peft=prompt_tuning")


def test_quantized_weights_train_only_through_lora():
    with pytest.raises(UserError, match=r"model.quantization='4bit': quantized weights cannot be "
                       r"trained directly \(method.peft=none\).*fix: method=lora"):
        typed_config("model.quantization=4bit")


def test_padding_free_and_bfd_packing_run_under_sdpa_but_not_with_prompt_tuning():
    assert typed_config("method.packing=true").method.packing_strategy == "bfd"  # sdpa, this CPU
    assert typed_config("method.packing=true", "method.padding_free=true").method.padding_free
    with pytest.raises(UserError, match=r"method.padding_free=True: without packing, TRL "
                       r"flattens batches without truncating.*fix: method.packing=true"):
        typed_config("method.padding_free=true")
    with pytest.raises(UserError, match=r"method.padding_free=True: prompt tuning puts its "
                       r"virtual tokens before a row.*fix: method.padding_free=false"):
        typed_config("method=prompt_tuning", "method.padding_free=true", "method.packing=true")
    with pytest.raises(UserError, match=r"method.packing_strategy='bfd': prompt tuning.*"
                       r"fix: method.packing_strategy=wrapped"):
        typed_config("method=prompt_tuning", "method.packing=true")
    assert typed_config("method=prompt_tuning", "method.packing=true",
                        "method.packing_strategy=wrapped").method.packing


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
