"""The embedded tiny model: a Llama-architecture causal LM and its tokenizer, built from a seed.

Nothing is downloaded and no binary is committed: the tokenizer is byte-level (every UTF-8 byte is
a token, so any text round-trips) plus a few special tokens, and the weights come from the model's
own initialisation under a fixed seed. The result is saved with `save_pretrained`, so every later
stage (training, lm-eval, accelerate workers) loads it like any hub model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# The turn terminator doubles as EOS: a model trained on chat data learns to emit it and stop.
# Pad is a separate token, so masking padding never masks EOS out of the loss.
EOS = "<|end|>"
PAD = "<|pad|>"
BOS = "<|bos|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# `{% generation %}` marks what the assistant says (EOS included), which TRL needs for
# assistant-only loss.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

BUILD_VERSION = 1  # bump when the construction below changes, so cached builds are rebuilt


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
    )
    return tokenizer


def build_model(architecture: dict[str, Any], seed: int, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(architecture)
    model_type = arch.pop("model_type")
    # A larger vocab_size (benchmarks/gpu_check.py: a real model's embedding and head sizes)
    # leaves rows no token of this tokenizer uses.
    config = AutoConfig.for_model(
        model_type,
        vocab_size=max(len(tokenizer), arch.pop("vocab_size", 0)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def materialize(name: str, architecture: dict[str, Any], seed: int, cache_root: Path) -> Path:
    """Return a directory holding the built model and tokenizer, building it once per settings."""
    key = json.dumps({"arch": architecture, "seed": seed, "v": BUILD_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = Path(cache_root).expanduser() / "embedded" / f"{name}-{digest}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(architecture, seed, tokenizer)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process built it first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
