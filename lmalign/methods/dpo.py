"""Direct preference optimisation with TRL's DPOTrainer, full or LoRA: build -> train -> save.

The reference model is TRL's: for full training a frozen copy of the starting model; for a new
LoRA adapter the starting model with the adapter switched off; when continuing an SFT adapter
(model.init_from a LoRA run) a frozen copy of that adapter. precompute_ref_log_probs scores
every pair under the reference once, before training, so no reference forward runs per step.
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
    """The DPOTrainer for this config, its model wrapped by PEFT when method.peft asks."""
    from trl import DPOConfig, DPOTrainer

    method, dpo = config.method, config.method.dpo
    tokenizer = models.load_start_tokenizer(start, config.model)
    model, peft_config = training.starting_model(config, start)
    train_data, eval_data = data.load_splits(config.dataset)
    args = DPOConfig(
        **training.trainer_arguments(config, run_dir, loggers.configure(config.logger, run_dir),
                                     has_eval=eval_data is not None),
        max_length=method.max_length,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_data,
                         eval_dataset=eval_data, processing_class=tokenizer,
                         peft_config=peft_config)
    training.use_compact_progress(trainer)
    return trainer
