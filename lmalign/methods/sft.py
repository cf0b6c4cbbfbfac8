"""Supervised fine-tuning with TRL's SFTTrainer: build -> train -> save."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmalign import data, loggers, models, training
from lmalign.schema import Config

log = logging.getLogger(__name__)


def train(config: Config, run_dir: Path, base_model: str) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    # build
    revision = config.model.revision if config.model.source == "pretrained" else None
    tokenizer = models.load_tokenizer(base_model, config.model, revision)
    model = models.load_model(base_model, config.model, config.hardware, revision)
    train_data, eval_data = data.load_splits(config.dataset)
    method = config.method
    args = SFTConfig(
        **training.trainer_arguments(config, run_dir, loggers.configure(config.logger, run_dir),
                                     has_eval=eval_data is not None),
        max_length=method.max_length,
        packing=method.packing,
        assistant_only_loss=_assistant_only_loss(config, tokenizer),
        completion_only_loss=method.completion_only_loss,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_data,
                         eval_dataset=eval_data, processing_class=tokenizer)
    training.use_compact_progress(trainer)
    parameters = training.announce_parameters(trainer.model)

    # train
    result = trainer.train(resume_from_checkpoint=training.resume_checkpoint(config, run_dir))

    # save
    training.save_final(trainer, run_dir)
    return {**parameters, **training.summary(trainer, result)}


def _assistant_only_loss(config: Config, tokenizer) -> bool:
    """Explicit values stand (validated); null trains on replies only where the data and the
    chat template allow it: TRL needs `{% generation %}` markers to find the replies."""
    if config.method.assistant_only_loss is not None:
        return config.method.assistant_only_loss
    marked = "{% generation %}" in (tokenizer.chat_template or "")
    chosen = config.dataset.format == "messages" and marked
    log.info("assistant-only loss: %s (dataset format %s, chat template %s generation markers)",
             "on" if chosen else "off", config.dataset.format, "with" if marked else "without")
    return chosen
