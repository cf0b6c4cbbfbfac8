"""Driver/worker launch (DESIGN, Launch): the Hydra job saves the resolved config and starts
`accelerate launch` on `lmalign.worker`, which reads it back; workers never compose config.

The distributed settings live in the hardware profile's file in launch/; world size, precision
and rendezvous are added here as launch arguments. The exact command goes into the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmalign import rundir
from lmalign.errors import TrainingStopped
from lmalign.schema import Config, HardwareConfig

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
RESOLVED_CONFIG = "resolved_config.json"   # what the workers read
LAUNCH_COMMAND = "launch_command.sh"       # what was run, to re-run by hand
TRAIN_SUMMARY = "train_summary.json"       # the main worker's summary for the driver's run.json
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def needs_workers(hardware: HardwareConfig) -> bool:
    """Several processes, or FSDP/DeepSpeed even on one GPU."""
    return hardware.world_size > 1 or hardware.distributed in ("fsdp", "deepspeed")


def launch_file(hardware: HardwareConfig) -> Path:
    path = Path(hardware.launch_config).expanduser()
    return path if path.is_absolute() or path.exists() else REPO / path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(config: Config, run_dir: Path, port: int | None = None) -> list[str]:
    hardware = config.hardware
    args = [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(launch_file(hardware)),
            "--num_processes", str(hardware.world_size),
            "--num_machines", "1", "--machine_rank", "0",
            "--mixed_precision", _MIXED_PRECISION[hardware.precision],
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port or _free_port())]
    if hardware.distributed == "deepspeed":
        args += ["--deepspeed_config_file", str(launch_file(hardware).with_suffix(".json"))]
    return args + ["-m", "lmalign.worker", str(Path(run_dir).resolve())]


def environment(hardware: HardwareConfig) -> dict[str, str]:
    env = dict(os.environ)
    if hardware.accelerator == "cpu":
        # With a CPU, `--cpu` would start one process; this keeps N processes on gloo.
        env["ACCELERATE_USE_CPU"] = "1"
    if hardware.torch_threads:
        env["OMP_NUM_THREADS"] = str(hardware.torch_threads)
    return env


def train_in_workers(config: Config, container: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Run training in `world_size` worker processes; return the main worker's summary."""
    rundir.atomic_write_json(run_dir / RESOLVED_CONFIG, container)
    (run_dir / TRAIN_SUMMARY).unlink(missing_ok=True)
    args = command(config, run_dir)
    rundir.atomic_write_text(run_dir / LAUNCH_COMMAND, "#!/usr/bin/env bash\n"
                             + shell_command(config.hardware, args) + "\n")
    log.info("launching %d worker processes (%s): %s", config.hardware.world_size,
             config.hardware.distributed, shlex.join(args))
    process = subprocess.Popen(args, env=environment(config.hardware), start_new_session=True)
    received: list[int] = []
    forwarded = _forward_signals(process, received)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        process.wait()
        raise
    finally:
        for number, previous in forwarded.items():
            signal.signal(number, previous)
    if code != 0:
        raise RuntimeError(f"the {config.hardware.world_size} training workers exited {code}; "
                           f"their output is above, the command in {run_dir / LAUNCH_COMMAND}")
    if not (run_dir / TRAIN_SUMMARY).exists():  # the workers stopped on a signal, cleanly
        cause = f"signal {received[0]} (forwarded to the workers)" if received else "a signal"
        saved = rundir.complete_checkpoints(run_dir)
        raise TrainingStopped(
            f"training stopped by {cause} after saving "
            f"{saved[-1][1] if saved else 'no checkpoint'}; run the same command again to resume")
    return json.loads((run_dir / TRAIN_SUMMARY).read_text())


def shell_command(hardware: HardwareConfig, args: list[str]) -> str:
    """The launch as a shell line, with the environment it needs (see `environment`)."""
    return ("ACCELERATE_USE_CPU=1 " if hardware.accelerator == "cpu" else "") + shlex.join(args)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(child) for child in task.read_text().split()]
    return found


def _forward_signals(process: subprocess.Popen, received: list[int]) -> dict[int, Any]:
    """SIGTERM/SIGUSR1/SIGUSR2 reach every worker, not the launcher between us: torch's elastic
    agent answers SIGTERM by killing its workers after a grace period, which could cut a
    checkpoint save short. Workers run in their own session, so a terminal's Ctrl-C reaches them
    once, through us. Where /proc is missing, the whole process group is signalled."""
    def forward(number, _frame) -> None:
        received.append(number)
        workers = _children(process.pid)
        if not workers:
            os.killpg(process.pid, number)
        for pid in workers:
            os.kill(pid, number)

    return {number: signal.signal(number, forward)
            for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
