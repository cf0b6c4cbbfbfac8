"""The run directory's one definition of a complete checkpoint."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from lmalign import rundir


def _checkpoint(run_dir, step: int):
    path = run_dir / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"weight": torch.ones(1000)}, str(path / "model.safetensors"))
    (path / rundir.CHECKPOINT_COMPLETE_MARKER).write_text("{}")
    return path


def test_a_checkpoint_without_its_state_file_or_with_truncated_weights_is_not_complete(
        tmp_path, caplog):
    first, second, third = (_checkpoint(tmp_path, step) for step in (10, 20, 30))
    (third / rundir.CHECKPOINT_COMPLETE_MARKER).unlink()  # the save was cut before its last file
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    assert rundir.complete_checkpoints(tmp_path) == [(10, first)]
    assert "skipping corrupt checkpoint" in caplog.text and "checkpoint-20" in caplog.text
    assert "model.safetensors is truncated (2000 bytes; its header describes" in caplog.text
    assert rundir.safetensors_problem(first / "model.safetensors") is None
