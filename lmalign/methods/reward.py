"""A reward model with TRL's RewardTrainer, full or LoRA: build -> train -> save.

The starting model (the configured one, or an earlier run's final/) gets a sequence-classification
head with one output, seeded by the run's seed, and learns to score the chosen reply above the
rejected one (TRL's Bradley-Terry loss). final/ is then a sequence-classification model (or its
adapter, which carries the head) that eval=reward and synthesis's scorer load.
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
    """The RewardTrainer for this config, its model wrapped by PEFT when method.peft asks."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    method = config.method
    tokenizer = models.load_start_tokenizer(start, config.model)
    set_seed(config.seed)  # the new score head's initial weights
    model, peft_config = training.starting_model(config, start)
    train_data, eval_data = data.load_splits(config.dataset)
    args = RewardConfig(
        **training.trainer_arguments(config, run_dir, loggers.configure(config.logger, run_dir),
                                     has_eval=eval_data is not None),
        max_length=method.max_length,
        center_rewards_coefficient=method.reward.center_rewards_coefficient,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_data,
                            eval_dataset=eval_data, processing_class=tokenizer,
                            peft_config=peft_config)
    training.use_compact_progress(trainer)
    return trainer
