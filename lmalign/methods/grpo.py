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
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        beta=grpo.beta,
        loss_type=grpo.loss_type,
        epsilon=grpo.epsilon,
        scale_rewards=grpo.scale_rewards,
        reward_weights=weights,
        **vllm_arguments(grpo),
        log_completions=grpo.log_completions,
        num_completions_to_print=0,  # the parquet files hold them; the console keeps one line
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions, args=args,
                          train_dataset=train_data, eval_dataset=eval_data,
                          processing_class=tokenizer, peft_config=peft_config)
    training.use_compact_progress(trainer)
    return trainer


def vllm_arguments(sampling: SamplingSettings) -> dict[str, Any]:
    """TRL's switches for generating with vLLM (checked installed and on a GPU at validation)."""
    if sampling.vllm_mode == "none":
        return {"use_vllm": False}
    found: dict[str, Any] = {"use_vllm": True, "vllm_mode": sampling.vllm_mode}
    if sampling.vllm_server_base_url:
        found["vllm_server_base_url"] = sampling.vllm_server_base_url
    return found
