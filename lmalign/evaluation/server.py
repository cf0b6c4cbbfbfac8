"""An OpenAI-compatible inference server for one model, started, awaited and always stopped.

Generation benchmarks (eval=nemo) and answers (eval=generate) come from a server: vLLM (`vllm
serve`), SGLang (`python -m sglang.launch_server`), transformers (`transformers serve`, which
runs on a CPU and is what the tests use), or an `external` address the user already runs.
lmalign picks a free port on 127.0.0.1, starts the server in its own process group with its log
in the run directory, waits until `/health` answers, and stops the whole group on the way out:
after the work, on an error, and on a stop. `served_model` says how a checkpoint is served (a
LoRA adapter as each server takes it, or merged first).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lmalign.errors import UserError, problem
from lmalign.launch import free_port

if TYPE_CHECKING:
    from lmalign.evaluation.cells import Target
    from lmalign.schema import HardwareConfig, JudgeEndpoint, ModelConfig

log = logging.getLogger(__name__)

ServerKind = Literal["vllm", "sglang", "transformers", "external"]
STOP_GRACE_SECONDS = 30
JUDGE_SERVER_DIR = "judge-server"  # in the run directory: a served judge's log


class ServerFailed(Exception):
    """The server exited or never answered; the message ends with the tail of its log."""


@dataclass(frozen=True)
class Launch:
    kind: ServerKind
    model: str  # a directory written by save_pretrained (or a hub id)
    served_name: str  # the name requests use as `model`
    device: Literal["cpu", "cuda"]
    tensor_parallel: int = 1
    data_parallel: int = 1
    dtype: str = "auto"
    extra_args: tuple[str, ...] = ()


def command(launch: Launch, port: int) -> list[str]:
    """The server's command line: each server's own flags for address, parallelism, dtype."""
    where = ["--host", "127.0.0.1", "--port", str(port)]
    if launch.kind == "vllm":
        return ["vllm", "serve", launch.model, *where, "--served-model-name", launch.served_name,
                "--tensor-parallel-size", str(launch.tensor_parallel),
                "--data-parallel-size", str(launch.data_parallel), "--dtype", launch.dtype,
                *launch.extra_args]
    if launch.kind == "sglang":
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", launch.model,
                *where, "--served-model-name", launch.served_name,
                "--tp-size", str(launch.tensor_parallel), "--dp-size", str(launch.data_parallel),
                "--dtype", launch.dtype, *launch.extra_args]
    if launch.kind == "transformers":
        return [sys.executable, "-m", "transformers.cli.transformers", "serve", launch.model,
                *where, "--device", launch.device, "--dtype", launch.dtype, *launch.extra_args]
    raise ValueError(f"no command for an {launch.kind} server")


def healthy(base_url: str, timeout: float = 2.0) -> bool:
    """GET /health, which vLLM, SGLang and transformers serve all answer with 200 once ready."""
    root = base_url.removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=timeout) as answer:
            return answer.status == 200
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Server:
    base_url: str  # OpenAI-compatible: http://127.0.0.1:<port>/v1
    pid: int | None  # leader of its process group; None for an external server


@contextmanager
def serving(launch: Launch, log_path: Path, startup_timeout: float,
            address: str | None = None) -> Iterator[Server]:
    """A healthy server while the block runs; stopped, with its processes, when it ends."""
    if launch.kind == "external":
        if not address:
            raise ValueError("an external server needs its address")
        yield Server(address.rstrip("/"), None)
        return
    port = free_port()
    argv = command(launch, port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as server_log:
        server_log.write(f"$ {' '.join(argv)}\n".encode())
        server_log.flush()
        try:
            process = subprocess.Popen(argv, stdout=server_log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except FileNotFoundError as exc:
            raise ServerFailed(f"cannot start the {launch.kind} server: {exc}") from None
    base_url = f"http://127.0.0.1:{port}/v1"
    log.info("starting the %s server on %s (log: %s)", launch.kind, base_url, log_path)
    _record(log_path.parent / SERVER_RECORD, process.pid)
    try:
        _await_health(process, base_url, launch, log_path, startup_timeout)
        yield Server(base_url, process.pid)
    finally:
        stop(process)
        (log_path.parent / SERVER_RECORD).unlink(missing_ok=True)


SERVER_RECORD = "server.json"  # in the cell's work directory: the server it started, for a re-run


@contextmanager
def judge_endpoint(judge: JudgeEndpoint, work: Path, hardware: HardwareConfig) -> Iterator[str]:
    """A judge's base URL: its base_url, or a server lmalign starts for judge.model (and always
    stops) when judge.server is set; its log is `work`/server.log."""
    if judge.server is None:
        yield judge.base_url or ""
        return
    end_left_behind(work)  # a run killed outright could not stop its judge
    launch = Launch(judge.server, judge.model or "", judge.model or "", hardware.accelerator)
    with serving(launch, work / "server.log", float(judge.server_startup_timeout_s)) as running:
        yield running.base_url


def client(base_url: str, api_key_env: str | None, max_retries: int, timeout: float):
    """The openai client for an OpenAI-compatible endpoint. The key is read from the variable
    `api_key_env` names and is written nowhere; a server without keys takes any. The client's
    own retries handle 429 (honouring Retry-After), 5xx and timeouts."""
    from openai import OpenAI

    key = os.environ.get(api_key_env or "", "")
    return OpenAI(base_url=base_url, api_key=key or "none", max_retries=max_retries,
                  timeout=timeout)


def sampling_fields(kind: str, temperature: float) -> dict[str, str]:
    """Request fields a server needs to sample at all: transformers serve takes do_sample from
    the model's generation config (greedy for many models) whatever the temperature; vLLM and
    SGLang sample whenever the temperature is above 0."""
    if kind == "transformers" and temperature > 0:
        return {"generation_config": '{"do_sample": true}'}
    return {}


def _record(path: Path, pid: int) -> None:
    import json

    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return
    path.write_text(json.dumps({"pid": pid, "started": started}))


def end_left_behind(work: Path) -> None:
    """A server a killed run left (SIGKILL leaves no chance to stop it): ended when the recorded
    pid is still that process (same start time), else only reported as gone."""
    import json

    import psutil

    path = work / SERVER_RECORD
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    try:
        process = psutil.Process(recorded["pid"])
        # Start times read at different moments may differ by a second (boot-time rounding).
        same = abs(process.create_time() - recorded["started"]) < 2.5
    except psutil.NoSuchProcess:
        same = False
    if same:
        log.warning("ending the server an earlier, stopped run left running (pid %d)",
                    recorded["pid"])
        _signal_group(recorded["pid"], signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except psutil.TimeoutExpired:
            _signal_group(recorded["pid"], signal.SIGKILL)
    path.unlink(missing_ok=True)


def _await_health(process: subprocess.Popen, base_url: str, launch: Launch, log_path: Path,
                  startup_timeout: float) -> None:
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise ServerFailed(f"the {launch.kind} server exited with status {process.returncode} "
                               f"while starting; its log ({log_path}) ends:\n{_tail(log_path)}")
        if healthy(base_url):
            log.info("the %s server answers after %.0f s", launch.kind,
                     time.monotonic() - started)
            return
        if time.monotonic() - started > startup_timeout:
            raise ServerFailed(f"the {launch.kind} server did not answer at {base_url} within "
                               f"{startup_timeout:.0f} s; its log ({log_path}) ends:\n"
                               f"{_tail(log_path)}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (vLLM and SGLang start workers), then
    SIGKILL to whatever is left after the grace period."""
    if process.poll() is not None and not group_alive(process.pid):
        return
    log.info("stopping the server (waiting up to %d s)", STOP_GRACE_SECONDS)
    _signal_group(process.pid, signal.SIGTERM)
    if not _ended(process, STOP_GRACE_SECONDS):  # one bound for the server and its workers
        log.warning("the server did not stop within %d s: killing it", STOP_GRACE_SECONDS)
        _signal_group(process.pid, signal.SIGKILL)
        _ended(process, 5)  # SIGKILL cannot be refused: only the kernel's teardown
    process.wait()


def _ended(process: subprocess.Popen, seconds: float) -> bool:
    """Whether the server and every process of its group ended within `seconds`."""
    deadline = time.monotonic() + seconds
    while process.poll() is None or group_alive(process.pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _signal_group(group: int, number: int) -> None:
    try:
        os.killpg(group, number)
    except ProcessLookupError:
        pass


def group_alive(group: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: a killed server's
    workers wait as zombies until whoever inherits them (init, or a subreaper) reaps them."""
    stats = list(Path("/proc").glob("[0-9]*/stat"))
    if not stats:  # no procfs: ask the kernel, zombies included
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for stat in stats:
        try:
            state, _parent, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # ended while we looked
        if state != "Z" and int(process_group) == group:
            return True
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's choices for --max-lora-rank


@dataclass(frozen=True)
class Served:
    launch: Launch
    name: str  # what `ns eval --model` asks the server for
    merged: Path | None = None  # a LoRA adapter merged for a server without adapters


def served_model(target: Target, kind: ServerKind, model: ModelConfig,
                 hardware: HardwareConfig, work: Path, otherwise: str) -> Served:
    """How a target is served: a hub revision from its snapshot in the hub cache (so the offline
    cache serves too), a LoRA adapter the way each server supports it, or merged first into
    `work`. otherwise: what to do instead for an adapter no server serves."""
    per_node = max(1, hardware.world_size // hardware.num_nodes)

    def launch(weights: str, name: str, *extra: str) -> Launch:
        return Launch(kind, weights, name, hardware.accelerator,
                             tensor_parallel=per_node, extra_args=extra)

    from lmalign import models

    path = target.path
    if kind == "external":  # it serves what it serves, under the name it was given
        return Served(launch(path, path), path)
    if target.revision:
        from huggingface_hub import snapshot_download

        path = snapshot_download(target.path, revision=target.revision)
    elif Path(path).is_dir():
        path = str(models.loadable(Path(path)))  # an FSDP checkpoint, consolidated once
    info = models.adapter_config(path)
    if info is None:
        return Served(launch(path, path), path)
    if models.adapter_kind(info) != "lora":
        raise UserError(problem(
            "eval.checkpoints", target.label, f"a {models.adapter_kind(info)} adapter, which no "
            "inference server serves", "full models and LoRA adapters", otherwise))
    base, name = info["base_model_name_or_path"], f"lmalign-{target.label}"
    if kind == "vllm":  # the base with the adapter beside it, asked for by its name
        rank = next((r for r in VLLM_LORA_RANKS if r >= int(info.get("r", 8))), VLLM_LORA_RANKS[-1])
        return Served(launch(base, base, "--enable-lora", "--lora-modules", f"{name}={path}",
                             "--max-lora-rank", str(rank)), name)
    if kind == "sglang":
        return Served(launch(base, base, "--lora-paths", f"{name}={path}"), name)
    merged = work / "merged-model"  # transformers serve has no adapters: merge into the work dir
    if not (merged / "config.json").exists():
        log.info("eval %s: merging the LoRA adapter into %s to serve it", target.label, base)
        models.merge_adapter(path, model, hardware, merged)
    return Served(launch(str(merged), str(merged)), str(merged), merged)
