"""One training process under `accelerate launch`: `python -m lmalign.worker <run_dir> <handoff>`,
or with `--evaluate` one evaluation process of a multi-process evaluation.

<handoff> is the driver's folder for this launch (lmalign/launch.py): the main worker writes
train_summary.json there when training finished; a worker stopped by a signal exits cleanly
without it, and the driver reports the stop.

Reads the config the driver resolved and saved (lmalign/launch.py); never composes config again.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(run_dir: Path, handoff: Path, evaluating: bool = False) -> None:
    from accelerate import PartialState
    from hydra.utils import get_method

    from lmalign import launch, models, rundir
    from lmalign.errors import TrainingStopped
    from lmalign.training import hold_stop_signals
    from lmalign.validate import validate

    config = validate(json.loads((handoff / launch.RESOLVED_CONFIG).read_text()),
                      check_environment=False)
    state = PartialState(cpu=config.hardware.accelerator == "cpu")
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format=f"[rank {state.process_index}][%(name)s][%(levelname)s] - "
                               "%(message)s")
    if config.hardware.torch_threads:
        import torch

        torch.set_num_threads(config.hardware.torch_threads)
    if evaluating:
        _evaluate(config, run_dir, handoff)
        _leave_together(state)
        return
    hold_stop_signals()
    train = get_method(config.method._target_)
    try:
        summary = train(config, run_dir, models.starting_point(config))
    except TrainingStopped:  # a checkpoint is saved; the driver says how to resume
        _leave_together(state)
        return  # a clean exit: the launcher must not report it as a crash
    if state.is_main_process:
        rundir.atomic_write_json(handoff / launch.TRAIN_SUMMARY, summary)
    _leave_together(state)


def _leave_together(state) -> None:
    """Every worker waits for the others, then closes the process group. A worker that finished
    its share first (lm-eval hands the last cell's results to rank 0, which still writes them)
    and exited with the group open could abort in the group's teardown ("terminate called
    without an active exception", SIGABRT), and the launcher then killed the others: seen once
    in CI on the 2-process evaluation."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


def _evaluate(config, run_dir: Path, handoff: Path) -> None:
    from accelerate import Accelerator
    from pydantic import TypeAdapter

    from lmalign import launch
    from lmalign.evaluation import generate, harness
    from lmalign.evaluation.cells import Target
    from lmalign.schema import ModelConfig

    request = json.loads((handoff / launch.EVAL_REQUEST).read_text())
    targets = [Target(**target) for target in request["targets"]]
    model = TypeAdapter(ModelConfig).validate_python(request["model"])
    accelerator = Accelerator(cpu=config.hardware.accelerator == "cpu")
    if not accelerator.is_main_process:  # lm-eval's warnings come once, from the main process
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    backends = request.get("backends", ["harness"])
    if "harness" in backends:
        harness.evaluate(targets, config.eval, run_dir, model, config.hardware, accelerator)
    if "generate" in backends:
        generate.evaluate(targets, config.eval, run_dir, model, config.hardware, accelerator)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), evaluating="--evaluate" in sys.argv[3:])
