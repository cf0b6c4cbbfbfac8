"""Driver/worker launch (docs/design.md, Launch and signals): the Hydra job saves the validated
config in its handoff folder and starts `accelerate launch` on `lmalign.worker`, which reads it
back; workers never compose config.

The distributed settings live in the hardware profile's file in launch/; world size, precision
and rendezvous are added here as launch arguments. The exact command goes into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmalign import rundir
from lmalign.errors import TrainingStopped, UserError, problem
from lmalign.schema import Config, HardwareConfig

log = logging.getLogger(__name__)
BUNDLED = Path(__file__).parent / "bundled"  # holds launch/ (see config_tree.BUNDLED)
# What a driver hands its workers lives in a folder of its own invocation, so a watcher and a
# training run (or two evaluations of one run) never read each other's files.
HANDOFF_DIR = "handoff"
RESOLVED_CONFIG = "resolved_config.json"   # what the workers read
LAUNCH_COMMAND = "launch_command.sh"       # what was run, to re-run by hand
TRAIN_SUMMARY = "train_summary.json"       # the main worker's summary for the driver's run.json
EVAL_REQUEST = "eval_request.json"         # what the evaluation workers evaluate
EVAL_LAUNCH_FILE = "launch/ddp.yaml"       # evaluation is data-parallel under every profile
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
MULTI_NODE_PORT = 29500  # across nodes outside SLURM (see _multi_node_port)


def needs_workers(hardware: HardwareConfig) -> bool:
    """Several processes, or FSDP/DeepSpeed even on one GPU."""
    return hardware.world_size > 1 or hardware.distributed in ("fsdp", "deepspeed")


def launch_file(hardware: HardwareConfig) -> Path:
    path = Path(hardware.launch_config).expanduser()
    return path if path.is_absolute() or path.exists() else BUNDLED / path


def free_port() -> int:
    """A port free on 127.0.0.1 now (the rendezvous of one node, a local inference server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    """Where this node's workers meet the others: accelerate's machine arguments."""
    num_machines: int
    machine_rank: int
    main_address: str
    main_port: int


def rendezvous(hardware: HardwareConfig, environ: Mapping[str, str] = os.environ) -> Rendezvous:
    """From the config where set, else from the SLURM allocation; one node meets on 127.0.0.1."""
    if hardware.num_nodes == 1:
        return Rendezvous(1, 0, "127.0.0.1", hardware.main_port or free_port())
    problems = rendezvous_problems(hardware, environ)
    if problems:
        raise UserError(problems)
    rank = hardware.node_rank if hardware.node_rank is not None else int(environ["SLURM_NODEID"])
    address = hardware.main_address or _slurm_node_address(
        _slurm_hostnames(environ["SLURM_JOB_NODELIST"])[0])
    return Rendezvous(hardware.num_nodes, rank, address,
                      hardware.main_port or _multi_node_port(environ))


def _multi_node_port(environ: Mapping[str, str]) -> int:
    """Every node must agree on the port, so it cannot be picked free. In a SLURM job it comes
    from the job id, so two jobs sharing a node do not collide."""
    job = environ.get("SLURM_JOB_ID", "")
    return 15000 + int(job[-4:]) if job.isdigit() else MULTI_NODE_PORT


def rendezvous_problems(hardware: HardwareConfig, environ: Mapping[str, str]) -> list[str]:
    if hardware.num_nodes == 1:
        return []
    problems = []
    in_slurm = "SLURM_JOB_NODELIST" in environ
    if in_slurm and environ.get("SLURM_NNODES") != str(hardware.num_nodes):
        problems.append(problem(
            "hardware.num_nodes", hardware.num_nodes, f"this SLURM job has "
            f"{environ.get('SLURM_NNODES')} node(s)", "the job's node count",
            f"hardware.num_nodes={environ.get('SLURM_NNODES')}, or submit with "
            f"--nodes={hardware.num_nodes}"))
    if hardware.node_rank is None and "SLURM_NODEID" not in environ:
        problems.append(problem(
            "hardware.node_rank", None, f"{hardware.num_nodes} nodes outside SLURM need each "
            "node's rank", f"0 to {hardware.num_nodes - 1}, one per node",
            "hardware.node_rank=0 on the main node, 1 on the next, ..."))
    if not hardware.main_address:
        if not in_slurm:
            problems.append(problem(
                "hardware.main_address", None, f"{hardware.num_nodes} nodes outside SLURM need "
                "the main node's address", "a host name or IP that every node reaches",
                "hardware.main_address=<node 0's address>"))
        elif shutil.which("scontrol") is None:
            problems.append(problem(
                "hardware.main_address", None, "the SLURM node list cannot be expanded: "
                "scontrol is not on PATH", "a host name or IP that every node reaches",
                "hardware.main_address=<node 0's address>"))
    return problems


def is_main_node(hardware: HardwareConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """Only the main node's driver records the run and evaluates; the others only train."""
    return hardware.num_nodes == 1 or rendezvous(hardware, environ).machine_rank == 0


def _slurm_node_address(node: str) -> str:
    """The address SLURM reaches the node at (its NodeAddr: often the name itself)."""
    found = subprocess.run(["scontrol", "show", "node", "--oneliner", node],
                           capture_output=True, text=True)
    for field in found.stdout.split():
        if field.startswith("NodeAddr="):
            return field.removeprefix("NodeAddr=")
    return node


def _slurm_hostnames(nodelist: str) -> list[str]:
    """SLURM's own expansion of a compressed node list (node[01-04] -> node01 ... node04)."""
    found = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                           text=True, check=True)
    return found.stdout.split()


def handoff_dir(run_dir: Path, config: Config) -> Path:
    """This invocation's folder for its workers: <run>/handoff/<stage>-<host>-<pid>/ holding
    the config they read (secrets as ***: they stay in the environment)."""
    from pydantic import TypeAdapter

    folder = Path(run_dir) / HANDOFF_DIR / f"{config.stage}-{socket.gethostname()}-{os.getpid()}"
    saved = TypeAdapter(Config).dump_python(config, mode="json")
    saved["secrets"] = {name: "***" for name in saved["secrets"]}
    rundir.atomic_write_json(folder / RESOLVED_CONFIG, saved)
    return folder


def command(config: Config, run_dir: Path, handoff: Path, meeting: Rendezvous | None = None,
            evaluate: bool = False) -> list[str]:
    """The launch of the workers. Evaluation is data-parallel whatever the profile shards in
    training: every process holds the whole model and scores its share of the requests."""
    hardware = config.hardware
    meeting = meeting or rendezvous(hardware)
    launch_config = BUNDLED / EVAL_LAUNCH_FILE if evaluate else launch_file(hardware)
    args = [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(launch_config),
            "--num_processes", str(hardware.world_size),
            "--num_machines", str(meeting.num_machines),
            "--machine_rank", str(meeting.machine_rank),
            "--mixed_precision", _MIXED_PRECISION[hardware.precision],
            "--main_process_ip", meeting.main_address,
            "--main_process_port", str(meeting.main_port)]
    if hardware.distributed == "deepspeed" and not evaluate:
        args += ["--deepspeed_config_file", str(launch_file(hardware).with_suffix(".json"))]
    return args + ["-m", "lmalign.worker", str(Path(run_dir).resolve()),
                   str(Path(handoff).resolve())] + (["--evaluate"] if evaluate else [])


def environment(hardware: HardwareConfig) -> dict[str, str]:
    env = dict(os.environ)
    if hardware.accelerator == "cpu":
        # With a CPU, `--cpu` would start one process; this keeps N processes on gloo.
        env["ACCELERATE_USE_CPU"] = "1"
    if hardware.torch_threads:
        env["OMP_NUM_THREADS"] = str(hardware.torch_threads)
    return env


def train_in_workers(config: Config, run_dir: Path) -> dict[str, Any]:
    """Run training in `world_size` worker processes; return the main worker's summary."""
    handoff = handoff_dir(run_dir, config)
    meeting = rendezvous(config.hardware)
    args = command(config, run_dir, handoff, meeting)
    if meeting.machine_rank == 0:
        rundir.atomic_write_text(run_dir / LAUNCH_COMMAND, "#!/usr/bin/env bash\n"
                                 + shell_command(config.hardware, args) + "\n")
    log.info("launching %d worker processes (%s)%s: %s",
             config.hardware.world_size // meeting.num_machines, config.hardware.distributed,
             f" on node {meeting.machine_rank} of {meeting.num_machines}"
             if meeting.num_machines > 1 else "", shlex.join(args))
    process = subprocess.Popen(args, env=environment(config.hardware), start_new_session=True,
                               preexec_fn=_ignore_cluster_signals)
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
    if meeting.machine_rank != 0:
        return {}  # the main node's driver reads the summary and records the run
    if not (handoff / TRAIN_SUMMARY).exists():  # the workers stopped on a signal, cleanly
        cause = f"signal {received[0]} (forwarded to the workers)" if received else "a signal"
        saved = rundir.complete_checkpoints(run_dir)
        raise TrainingStopped(
            f"training stopped by {cause} after saving "
            f"{saved[-1][1] if saved else 'no checkpoint'}; run the same command again to resume",
            received[-1] if received else None)  # the last, as the workers take it
    return json.loads((handoff / TRAIN_SUMMARY).read_text())


def evaluation_processes(hardware: HardwareConfig) -> int:
    """Evaluation runs on the main node alone: its share of the profile's processes."""
    return hardware.world_size // hardware.num_nodes if needs_workers(hardware) else 1


def evaluate_in_workers(config: Config, run_dir: Path, request: dict[str, Any]) -> None:
    """Evaluate in this node's processes, each scoring its share of every cell's requests; the
    main one writes the cells."""
    processes = evaluation_processes(config.hardware)
    handoff = handoff_dir(run_dir, config)
    rundir.atomic_write_json(handoff / EVAL_REQUEST, request)
    hardware = config.hardware
    args = command(dataclasses.replace(config, hardware=dataclasses.replace(
        hardware, world_size=processes)), run_dir, handoff,
        Rendezvous(1, 0, "127.0.0.1", free_port()), evaluate=True)
    log.info("evaluating in %d processes: %s", processes, shlex.join(args))
    code = subprocess.run(args, env=environment(hardware),
                          preexec_fn=_ignore_cluster_signals).returncode
    if code != 0:
        raise RuntimeError(f"the {processes} evaluation workers exited {code}; their output is "
                           "above")


def shell_command(hardware: HardwareConfig, args: list[str]) -> str:
    """The launch as a shell line, with the environment it needs (see `environment`)."""
    return ("ACCELERATE_USE_CPU=1 " if hardware.accelerator == "cpu" else "") + shlex.join(args)


def _ignore_cluster_signals() -> None:
    """In the launcher process, before exec: SLURM signals every process of a job step, and
    SIGUSR1/SIGUSR2's default action would kill accelerate's launcher (and torch's agent) while
    the workers save. Ignored here, the workers inherit it until they install their own
    handlers (lmalign.training.hold_stop_signals holds them until training begins)."""
    for number in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)


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
