"""Each guard on method, PEFT and packing combinations: one line naming key, value and fix."""

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
