"""Supervised fine-tuning with TRL's SFTTrainer: full, LoRA or prompt tuning. build -> train -> save.

method.peft picks what trains: every weight (none), a LoRA adapter, or prompt-tuning virtual
tokens; TRL wraps the model with PEFT from the config, and the base weights stay frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmalign import data, loggers, models, training
from lmalign.errors import UserError, problem
from lmalign.models import Start
from lmalign.schema import Config

log = logging.getLogger(__name__)


def train(config: Config, run_dir: Path, start: Start) -> dict[str, Any]:
    return training.train_and_save(build(config, run_dir, start), config, run_dir)


def build(config: Config, run_dir: Path, start: Start):
    """The SFTTrainer for this config, its model wrapped by PEFT when method.peft asks."""
    from trl import SFTConfig, SFTTrainer

    method = config.method
    tokenizer = models.load_start_tokenizer(start, config.model)
    model, peft_config = training.starting_model(config, start)
    train_data, eval_data = data.load_splits(config.dataset)
    args = SFTConfig(
        **training.trainer_arguments(config, run_dir, loggers.configure(config.logger, run_dir),
                                     has_eval=eval_data is not None),
        max_length=method.max_length,
        packing=method.packing,
        packing_strategy=method.packing_strategy,
        padding_free=method.padding_free,
        assistant_only_loss=_assistant_only_loss(config, tokenizer),
        completion_only_loss=method.completion_only_loss,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_data,
                         eval_dataset=eval_data, processing_class=tokenizer,
                         peft_config=peft_config)
    training.use_compact_progress(trainer)
    return trainer


def _assistant_only_loss(config: Config, tokenizer) -> bool:
    """Explicit values stand (validated); null trains on replies only where the data is chat and
    the template can mark replies: its own `{% generation %}` markers, or TRL's training version
    of a known template (TRL swaps it in itself)."""
    explicit = config.method.assistant_only_loss
    if explicit is False or config.dataset.format != "messages":
        return False
    support = training_template_support(tokenizer)
    if explicit and not support:
        raise UserError(problem(
            "method.assistant_only_loss", True, "the chat template has no {% generation %} "
            "markers around assistant replies and TRL has no training version of it",
            "true with a template that marks replies",
            "model.chat_template_path=<a Jinja file with {% generation %}...{% endgeneration %} "
            "around each assistant reply>, or method.assistant_only_loss=null"))
    if explicit:
        return True
    log.info("assistant-only loss: %s (chat template %s)", "on" if support else "off",
             support or "has no {% generation %} markers and TRL has no training version of it; "
             "training on whole conversations")
    return bool(support)


def training_template_support(tokenizer) -> str | None:
    """How the template marks assistant replies for TRL, or None when it cannot."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template or ""
    if template and has_generation_markers(template):
        return "marks replies with {% generation %}"
    try:
        return "replaced by TRL's training version" if template and get_training_chat_template(
            tokenizer) else None
    except ValueError:
        return None
