"""REINFORCE leave-one-out with TRL's RLOOTrainer, full or LoRA: build -> train -> save.

Sampling and rewards as in methods/grpo.py (method.rewards, global_batch_size counting
completions); each completion's advantage is its reward minus the mean of the other completions
for its prompt, and the KL to the starting model (rloo.beta) enters the reward.
TRL's RLOOTrainer sends its completion table only to W&B or trackio; the subclass below also
writes it where GRPOTrainer writes its own, checkpoints/completions/, so both methods leave the
same record.
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
    trainer = _with_completion_files(RLOOTrainer)(
        model=model, reward_funcs=reward_functions, args=args, train_dataset=train_data,
        eval_dataset=eval_data, processing_class=tokenizer, peft_config=peft_config)
    training.use_compact_progress(trainer)
    return trainer


def _with_completion_files(trainer_class):
    """RLOOTrainer whose log() also saves the step's completions as GRPOTrainer does."""
    import pandas as pd

    class RLOOTrainerWithCompletionFiles(trainer_class):
        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # TRL's own table (_logs: the latest generation batch), the columns GRPOTrainer writes
            if self.accelerator.is_main_process and self.log_completions and self._logs["prompt"]:
                table = pd.DataFrame({
                    "step": [self.state.global_step] * len(self._logs["prompt"]),
                    "prompt": list(self._logs["prompt"]),
                    "completion": list(self._logs["completion"]),
                    **{name: list(values) for name, values in self._logs["rewards"].items()},
                    **{name: list(values) for name, values in self._logs["extra"].items()},
                    "advantage": list(self._logs["advantages"]),
                })
                folder = Path(self.args.output_dir) / "completions"
                folder.mkdir(parents=True, exist_ok=True)
                final = folder / f"completions_{self.state.global_step:05d}.parquet"
                table.to_parquet(final.with_suffix(".partial"))
                final.with_suffix(".partial").replace(final)  # a reader never sees half a file
            super().log(logs, start_time)

    return RLOOTrainerWithCompletionFiles
