"""Direct preference optimisation with TRL's DPOTrainer: build -> train -> save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmalign import data, loggers, models, training
from lmalign.schema import Config


def train(config: Config, run_dir: Path, base_model: str) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    # build
    revision = config.model.revision if config.model.source == "pretrained" else None
    tokenizer = models.load_tokenizer(base_model, config.model, revision)
    model = models.load_model(base_model, config.model, config.hardware, revision)
    train_data, eval_data = data.load_splits(config.dataset)
    method, dpo = config.method, config.method.dpo
    args = DPOConfig(
        **training.trainer_arguments(config, run_dir, loggers.configure(config.logger, run_dir),
                                     has_eval=eval_data is not None),
        max_length=method.max_length,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
    )
    # No ref_model: TRL copies the starting model as the frozen reference.
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_data,
                         eval_dataset=eval_data, processing_class=tokenizer)
    training.use_compact_progress(trainer)
    parameters = training.announce_parameters(trainer.model)

    # train
    result = trainer.train(resume_from_checkpoint=training.resume_checkpoint(config, run_dir))

    # save
    training.save_final(trainer, run_dir)
    return {**parameters, **training.summary(trainer, result)}
