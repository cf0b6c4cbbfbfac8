"""REINFORCE leave-one-out with TRL's RLOOTrainer, full or LoRA: build -> train -> save.

Sampling and rewards as in methods/grpo.py (method.rewards, global_batch_size counting
completions); each completion's advantage is its reward minus the mean of the other completions
for its prompt, and the KL to the starting model (rloo.beta) enters the reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmalign import data, loggers, models, rewards, training
from lmalign.methods import grpo
from lmalign.models import Start
from lmalign.schema import Config


def train(config: Config, run_dir: Path, start: Start) -> dict[str, Any]:
    return training.train_and_save(build(config, run_dir, start), config, run_dir)


def build(config: Config, run_dir: Path, start: Start):
    """The RLOOTrainer for this config, its model wrapped by PEFT when method.peft asks."""
    from trl import RLOOConfig, RLOOTrainer

    rloo = config.method.rloo
    tokenizer = models.load_start_tokenizer(start, config.model)
    model, peft_config = training.starting_model(config, start)
    train_data, eval_data = data.load_splits(config.dataset)
    reward_functions, weights = rewards.build(config.method.active_rewards,
                                              columns=train_data.column_names, config=config)
    args = RLOOConfig(
        **training.trainer_arguments(config, run_dir, loggers.configure(config.logger, run_dir),
                                     has_eval=eval_data is not None),
        **grpo.sampling_arguments(rloo, weights),
        normalize_advantages=rloo.normalize_advantages,
    )
    trainer = RLOOTrainer(model=model, reward_funcs=reward_functions, args=args,
                          train_dataset=train_data, eval_dataset=eval_data,
                          processing_class=tokenizer, peft_config=peft_config)
    training.use_compact_progress(trainer)
    return trainer
