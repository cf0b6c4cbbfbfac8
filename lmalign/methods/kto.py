"""Kahneman-Tversky optimisation with TRL's KTOTrainer, full or LoRA: build -> train -> save.

KTO learns from single replies labelled desirable or not (dataset.format=unpaired, or preference
pairs split by dataset.unpair), against a reference as DPO does: a frozen copy of the starting
model, or for LoRA the model with the adapter off. Each step also estimates the KL term from
mismatched prompt/completion pairs within the batch, so a batch needs at least two rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmalign import data, loggers, models, training
from lmalign.models import Start
from lmalign.schema import Config


def train(config: Config, run_dir: Path, start: Start) -> dict[str, Any]:
    return training.train_and_save(build(config, run_dir, start), config, run_dir)


def build(config: Config, run_dir: Path, start: Start):
    """The KTOTrainer for this config, its model wrapped by PEFT when method.peft asks."""
    from trl import KTOConfig, KTOTrainer

    method, kto = config.method, config.method.kto
    tokenizer = models.load_start_tokenizer(start, config.model)
    model, peft_config = training.starting_model(config, start)
    train_data, eval_data = data.load_splits(config.dataset)
    args = KTOConfig(
        **training.trainer_arguments(config, run_dir, loggers.configure(config.logger, run_dir),
                                     has_eval=eval_data is not None),
        max_length=method.max_length,
        beta=kto.beta,
        loss_type=kto.loss_type,
        desirable_weight=kto.desirable_weight,
        undesirable_weight=kto.undesirable_weight,
    )
    trainer = KTOTrainer(model=model, args=args, train_dataset=train_data,
                         eval_dataset=eval_data, processing_class=tokenizer,
                         peft_config=peft_config)
    training.use_compact_progress(trainer)
    return trainer
