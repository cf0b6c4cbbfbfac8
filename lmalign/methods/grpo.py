"""Group relative policy optimisation with TRL's GRPOTrainer, full or LoRA: build -> train -> save.

Each step samples grpo.num_generations completions for each of global_batch_size /
num_generations prompts, scores them with method.rewards (lmalign/rewards.py, weighted and
summed), and moves the policy towards the completions that beat their group's mean. Generation
runs in the training process (CPU or one GPU), or through vLLM (grpo.vllm_mode) on GPUs. With grpo.beta > 0 the reference for the KL term
is TRL's: a frozen copy of the starting model, or for LoRA the model with the adapter off.
Completions with their rewards land in the run's checkpoints/completions/ (grpo.log_completions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmalign import data, loggers, models, rewards, training
from lmalign.models import Start
from lmalign.schema import Config, SamplingSettings


def train(config: Config, run_dir: Path, start: Start) -> dict[str, Any]:
    return training.train_and_save(build(config, run_dir, start), config, run_dir)


def build(config: Config, run_dir: Path, start: Start):
    """The GRPOTrainer for this config, its model wrapped by PEFT when method.peft asks."""
    from trl import GRPOConfig, GRPOTrainer

    grpo = config.method.grpo
    tokenizer = models.load_start_tokenizer(start, config.model)
    model, peft_config = training.starting_model(config, start)
    train_data, eval_data = data.load_splits(config.dataset)
    reward_functions, weights = rewards.build(config.method.active_rewards,
                                               columns=train_data.column_names, config=config)
    args = GRPOConfig(
        **training.trainer_arguments(config, run_dir, loggers.configure(config.logger, run_dir),
                                     has_eval=eval_data is not None),
        **sampling_arguments(grpo, weights),
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions, args=args,
                          train_dataset=train_data, eval_dataset=eval_data,
                          processing_class=tokenizer, peft_config=peft_config)
    training.use_compact_progress(trainer)
    return trainer


def sampling_arguments(sampling: SamplingSettings, weights: list[float]) -> dict[str, Any]:
    """GRPOConfig's and RLOOConfig's shared knobs: sampling, KL, clipping, rewards, vLLM, logs."""
    found: dict[str, Any] = dict(
        num_generations=sampling.num_generations,
        max_completion_length=sampling.max_completion_length,
        temperature=sampling.temperature,
        beta=sampling.beta,
        epsilon=sampling.epsilon,
        reward_weights=weights,
        log_completions=sampling.log_completions,
        num_completions_to_print=0,  # the parquet files hold them; the console keeps one line
        use_vllm=sampling.vllm_mode != "none",  # installed and on a GPU: checked at validation
    )
    if sampling.vllm_mode != "none":
        found["vllm_mode"] = sampling.vllm_mode
        if sampling.vllm_server_base_url:
            found["vllm_server_base_url"] = sampling.vllm_server_base_url
    return found
