"""Tiny GRPO speed: lmalign's method=grpo vs a plain TRL GRPOTrainer script, steps per second.

    python benchmarks/grpo_throughput.py [--steps 30] [--repeats 4]

Both sides train the embedded tiny model (the README's SFT run when --start names one) on the
same tiny_prompts rows with the same GRPOConfig (the one lmalign builds: batch, group size,
completion length, temperature, beta, seed) and the tiny task's reward, in this one process,
alternating so machine noise falls on both. Steps per second are optimizer steps over TRL's
train_runtime (generation, reward and update all inside it). The figure is the ratio; nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import typed_config  # noqa: E402  (composes the real config tree)


def setup(steps: int, start: str | None):
    from lmalign import models

    overrides = ["method=grpo", "dataset=tiny_prompts", f"method.max_steps={steps}",
                 "eval=none", f"method.save_steps={steps * 10}", f"method.logging_steps={steps}",
                 "method.grpo.log_completions=false"]
    if start:
        overrides.append(f"model.init_from={start}")
    config = typed_config(*overrides)
    cache = Path(tempfile.mkdtemp(prefix="lmalign-bench-"))
    base = str(models.starting_point(config).path) if start else \
        str(models.resolve(config.model, str(cache)))
    return config, base


def run_lmalign(config, base: str) -> tuple[float, float]:
    from lmalign import models, training
    from lmalign.methods import grpo

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = grpo.build(config, Path(run_dir), models.Start(base, None, tokenizer=base))
        summary = training.train_and_save(trainer, config, Path(run_dir))
    return summary["global_step"] / summary["train_runtime_s"], _mean_reward(trainer)


def run_trl(config, base: str) -> tuple[float, float]:
    """The plain script: TRL's trainer, lmalign's GRPOConfig, the tiny reward, nothing else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from lmalign import data, models, rewards
    from lmalign.methods import grpo

    with tempfile.TemporaryDirectory() as run_dir:
        args = grpo.build(config, Path(run_dir), models.Start(base, None, tokenizer=base)).args
        train, _ = data.load_splits(config.dataset)
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(base),
                              reward_funcs=[rewards.tiny_task], args=args, train_dataset=train,
                              processing_class=AutoTokenizer.from_pretrained(base))
        result = trainer.train()
    return trainer.state.global_step / result.metrics["train_runtime"], _mean_reward(trainer)


def _mean_reward(trainer) -> float:
    found = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return found[-1] if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=4,
                        help="per side, alternating: one pair of runs moves by 10%% on 2 cores")
    parser.add_argument("--start", default=None, help="a tiny SFT run (run_name under runs/, "
                        "or its directory) to start from; default: the untrained tiny model")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        sys.exit("error: --steps and --repeats take 1 or more")
    import torch

    torch.set_num_threads(2)
    config, base = setup(args.steps, args.start)
    speeds: dict[str, list[float]] = {"lmalign": [], "trl": []}
    for repeat in range(args.repeats):
        # Alternate which side goes first, so a slow patch of the machine falls on both.
        order = [("lmalign", run_lmalign), ("trl", run_trl)]
        for name, runner in order if repeat % 2 == 0 else order[::-1]:
            speed, reward = runner(config, base)
            speeds[name].append(speed)
            print(f"{name:8s} repeat {repeat + 1}: {speed:.3f} steps/s (last reward {reward:.3f})",
                  flush=True)
    ours, theirs = (statistics.median(speeds[k]) for k in ("lmalign", "trl"))
    print(f"\nGRPO, {args.steps} steps x {config.method.global_batch_size} completions "
          f"({config.method.global_batch_size // config.method.grpo.num_generations} prompts x "
          f"{config.method.grpo.num_generations}), median of {args.repeats}:")
    print(f"  lmalign {ours:.3f} steps/s, plain TRL {theirs:.3f} steps/s: "
          f"lmalign at {ours / theirs:.3f}x of TRL")


if __name__ == "__main__":
    main()
