"""stage=merge: a run's final/ LoRA adapter merged into its base model, a full model in
merged/ for serving (`python -m lmalign stage=merge run_name=<lora run>`)."""

from __future__ import annotations

import logging
from pathlib import Path

from lmalign import models, rundir
from lmalign.errors import UserError, problem
from lmalign.schema import Config, ModelConfig

log = logging.getLogger(__name__)
MERGED = "merged"


def is_merged(run_dir: Path) -> bool:
    return (Path(run_dir) / MERGED / "config.json").exists()


def refuse_unmergeable(run_dir: Path) -> None:
    """Before anything is written: final/ must be a LoRA adapter."""
    final = rundir.final_dir(run_dir)
    info = models.adapter_config(final) if final else None
    kind = models.adapter_kind(info) if info else None
    if kind != "lora":
        raise UserError(problem(
            "stage", "merge", f"{run_dir / rundir.FINAL} holds " + (
                "no trained model" if not final else "a full model already" if info is None
                else f"a {kind} adapter, which has no weights to merge into"),
            "stage=merge on a run whose final/ is a LoRA adapter",
            "evaluate or serve final/ as it is, or train with method=lora first"))


def merge_final(run_dir: Path, model: ModelConfig, config: Config) -> Path:
    """final/'s adapter merged into its base (model): a full model in merged/."""
    merged = Path(run_dir) / MERGED
    if is_merged(run_dir):
        log.info("already merged: %s", merged)
        return merged
    refuse_unmergeable(run_dir)
    final = rundir.final_dir(run_dir)
    models.merge_adapter(str(final), model, config.hardware, merged)
    log.info("merged %s into its base model: %s", final, merged)
    return merged
