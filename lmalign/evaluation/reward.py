"""eval=reward: a reward model's pairwise accuracy and mean margin on held-out preference pairs.

The pairs are the held-out split of the dataset the run trained on (as its record says), or a
preference file (eval.reward.pairs). Each checkpoint scores chosen and rejected through
lmalign.scoring, as RewardTrainer rendered them in training; `scores.jsonl` in the cell keeps
every pair's two scores. A reward model scores text and generates nothing, so it is evaluated
by this backend alone; the other backends on it are an error before anything loads.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from pathlib import Path
from typing import Any

from lmalign import data, models, rundir, scoring
from lmalign.errors import problem
from lmalign.evaluation import cells
from lmalign.evaluation.cells import Target
from lmalign.schema import Config, DatasetConfig, EvalConfig, HardwareConfig, ModelConfig

log = logging.getLogger(__name__)
SCORES = "scores.jsonl"


def pairs_source(config: Config, run_dir: Path) -> DatasetConfig:
    """Where the held-out pairs come from: eval.reward.pairs, else the trained run's dataset."""
    pairs = config.eval.reward.pairs
    if pairs is not None:
        return DatasetConfig(
            name=Path(pairs).name.split(".")[0], source="local", format="preference",
            path=pairs, subset=None, revision=None, train_split="train", eval_split=None,
            eval_size=0, columns={}, where={}, max_samples=None, max_eval_samples=None,
            seed=config.seed, unpair=False, prompt_template=None, from_run=None)
    saved = rundir.saved_config(run_dir) if config.reads_a_run else None
    return saved.dataset if saved is not None and saved.trains else config.dataset


def source_problems(source: DatasetConfig, pairs: str | None) -> list[str]:
    """Before anything trains: the pairs exist and are held out."""
    if pairs is not None:
        if not Path(pairs).expanduser().exists():
            return [problem("eval.reward.pairs", pairs, "no such file or directory",
                            "a preference file (jsonl, json, parquet, ...) or save_to_disk "
                            "directory", "fix the path, or eval.reward.pairs=null for the held-out "
                            "split of the run's dataset")]
        return []
    if source.format != "preference":
        return [problem("eval.reward.pairs", None, f"the run's dataset={source.name} holds "
                        f"{source.format} data, not preference pairs", "a preference dataset "
                        "the run trained on, or a preference file",
                        "eval.reward.pairs=<a preference file>")]
    if not source.eval_split and not source.eval_size:
        return [problem("eval.reward.pairs", None, f"dataset={source.name} has no held-out "
                        "split (dataset.eval_split and dataset.eval_size are unset), and "
                        "accuracy on training pairs says little", "a held-out split or a "
                        "preference file", "dataset.eval_size=200, or eval.reward.pairs=<file>")]
    return []


def settings(evaluation: EvalConfig, source: DatasetConfig) -> dict[str, Any]:
    """Everything that changes the scores; part of a cell's identity (a pairs file by content)."""
    reward = evaluation.reward
    # the seed draws a base model's new (untrained) score head
    found: dict[str, Any] = {"backend": "reward", "max_pairs": reward.max_pairs,
                             "max_length": reward.max_length, "seed": evaluation.seed}
    if reward.pairs is not None:
        found["pairs"] = reward.pairs
        found["pairs_sha256"] = cells.content_hash(Path(reward.pairs).expanduser())
    else:
        found["pairs"] = {key: getattr(source, key) for key in (
            "name", "source", "path", "subset", "revision", "eval_split", "eval_size",
            "max_eval_samples", "columns", "where", "seed")}
    return found


def requested_cells(targets: list[Target], evaluation: EvalConfig, run_dir: Path,
                    source: DatasetConfig) -> list[Path]:
    return [cells.cell_dir(run_dir, target, settings(evaluation, source)) for target in targets]


def target_problems(targets: list[Target], evaluation: EvalConfig, method: str) -> list[str]:
    """A reward model with a backend that needs a language model, or eval=reward on a language
    model (a reward run's base is the exception: its new head scores at chance, the baseline)."""
    others = [b for b in evaluation.backends if b != "reward"]
    problems = []
    for target in targets:
        kind = models.reward_model_kind(target.path, target.revision)
        if kind is True and others:
            problems.append(problem(
                "eval", f"[{','.join(evaluation.backends)}]", f"{target.label} ({target.path}) "
                f"is a reward model: it scores text and generates nothing, so "
                f"{', '.join(others)} cannot evaluate it", "eval=reward for a reward model",
                "eval=reward"))
        elif kind is False and evaluation.reward is not None and not (
                target.label == "base" and method == "reward"):
            problems.append(problem(
                "eval", f"[{','.join(evaluation.backends)}]", f"{target.label} ({target.path}) "
                "is a language model, not a reward model (no sequence-classification head)",
                "eval=reward for method=reward runs and reward models",
                f"eval=[{','.join(others) or 'harness'}], or a method=reward run"))
    return list(dict.fromkeys(problems))


def held_out_pairs(evaluation: EvalConfig, source: DatasetConfig):
    """The pairs in TRL's preference columns (prompt, chosen, rejected), at most max_pairs."""
    train, held_out = data.load_splits(source)
    pairs = train if evaluation.reward.pairs is not None else held_out
    limit = evaluation.reward.max_pairs
    return pairs.select(range(min(limit, len(pairs)))) if limit else pairs


def evaluate(targets: list[Target], evaluation: EvalConfig, run_dir: Path, model: ModelConfig,
             hardware: HardwareConfig, source: DatasetConfig) -> None:
    cell_settings = settings(evaluation, source)
    pending = [t for t in targets
               if not cells.is_complete(cells.cell_dir(run_dir, t, cell_settings))]
    for target in targets:
        if target not in pending:
            log.info("eval %s: reward cell done, skipping", target.label)
    if not pending:
        return
    from transformers import set_seed

    pairs = held_out_pairs(evaluation, source)
    for target in pending:
        cell = cells.cell_dir(run_dir, target, cell_settings)
        log.info("eval %s: %d held-out pair(s) of %s -> %s", target.label, len(pairs),
                 source.name, cell.relative_to(run_dir))
        tokenizer = models.load_tokenizer(target.path, model, target.revision)
        set_seed(evaluation.seed)
        loaded = models.load_trained(target.path, model, hardware, target.revision,
                                     head="reward")
        if hardware.accelerator == "cuda" and model.quantization == "none":
            loaded.to("cuda")
        items = [_joined(row["prompt"], row[side]) for side in ("chosen", "rejected")
                 for row in pairs]
        found = scoring.score(loaded, tokenizer, items, 2 * evaluation.reward.batch_size,
                              evaluation.reward.max_length, f"scoring {target.label}")
        chosen, rejected = found[:len(pairs)], found[len(pairs):]
        with rundir.staged_directory(cell) as staging:
            rundir.atomic_write_text(staging / SCORES, "".join(
                json.dumps({"index": i, "chosen": c, "rejected": r}) + "\n"
                for i, (c, r) in enumerate(zip(chosen, rejected))))
            cells.write_record(staging, target, cell_settings,
                               metric_rows(chosen, rejected, target, source.name))
        del loaded
        gc.collect()


def _joined(prompt, reply):
    """prompt + reply as TRL joins them: conversations by turns, text by concatenation."""
    if isinstance(reply, list):
        return list(prompt or []) + list(reply)
    return (prompt or "") + reply


def metric_rows(chosen: list[float], rejected: list[float], target: Target,
                task: str) -> list[dict[str, Any]]:
    """pairwise_accuracy (ties count half) with its binomial stderr; the mean margin."""
    n = len(chosen)
    if not n:
        return []
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    accuracy = sum(wins) / n
    margins = [c - r for c, r in zip(chosen, rejected)]
    mean_margin = sum(margins) / n
    spread = math.sqrt(sum((m - mean_margin) ** 2 for m in margins) / (n - 1)) if n > 1 else 0.0
    values = {"pairwise_accuracy": (accuracy, math.sqrt(accuracy * (1 - accuracy) / n)),
              "margin": (mean_margin, spread / math.sqrt(n))}
    return [{"checkpoint": target.label, "step": target.step, "backend": "reward",
             "task": task, "group": None, "metric": metric, "num_fewshot": None,
             "eval_mode": "none", "value": value, "stderr": stderr}
            for metric, (value, stderr) in values.items()]
