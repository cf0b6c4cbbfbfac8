"""Model and tokenizer loading: the embedded tiny model and hub/local models share one path."""

from __future__ import annotations

import logging
from pathlib import Path

from lmalign import embedded
from lmalign.schema import HardwareConfig, ModelConfig

log = logging.getLogger(__name__)

_PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve(model: ModelConfig, cache_dir: str) -> str:
    """What from_pretrained should load: the built embedded model's directory, or the hub id/path."""
    if model.source == "embedded":
        return str(embedded.materialize(model.name, model.architecture, model.seed,
                                        Path(cache_dir)))
    return model.name_or_path


def load_tokenizer(path: str, model: ModelConfig, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision,
                                              trust_remote_code=model.trust_remote_code)
    if model.chat_template_path:
        tokenizer.chat_template = Path(model.chat_template_path).expanduser().read_text()
    if model.eos_token:
        tokenizer.eos_token = model.eos_token
    if tokenizer.pad_token is None:
        # TRL pads by position, so pad == eos no longer masks EOS out of the loss; say so anyway.
        log.info("tokenizer has no pad token; using eos %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(model: ModelConfig, hardware: HardwareConfig):
    import torch

    name = model.dtype if model.dtype != "auto" else _PRECISION_DTYPE[hardware.precision]
    return getattr(torch, name)


def load_model(path: str, model: ModelConfig, hardware: HardwareConfig,
               revision: str | None = None):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=torch_dtype(model, hardware),
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code)
    return loaded


def build_on_meta(model: ModelConfig):
    """The model with no weights, from its recorded architecture numbers: works offline.

    PyTorch's meta device, not accelerate's init_empty_weights: under transformers 5 the latter
    leaves tied embeddings untied (SmolLM2-135M then counts 162.8M parameters instead of 134.5M).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(model.architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(module) -> tuple[int, int]:
    """(trainable, total); tied weights count once."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total
