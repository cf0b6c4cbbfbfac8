"""What a run needs of this machine, checked before anything heavy loads: the model can be
loaded here (or fetched), local files exist, the hardware profile's GPUs, bf16, DeepSpeed and
flash-attn are here. A profile default this machine cannot honour falls back with a one-line
notice; a value the user set is an error (docs/design.md, Errors and exit codes)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Collection
from pathlib import Path

from lmalign import models
from lmalign.errors import problem
from lmalign.launch import launch_file, rendezvous_problems
from lmalign.schema import Config, precision_of

log = logging.getLogger(__name__)


def check_environment_for(config: Config,
                          explicit_keys: Collection[str] = ()) -> tuple[Config, list[str]]:
    """(the config with announced fallbacks applied, problems)."""
    problems: list[str] = []
    if not config.loads_weights or config.dry_run:
        return config, problems
    # offline=true: the run's needs are checked against the cache's manifest instead.
    if config.stage == "synthesize":
        problems += [] if config.offline else _synthesis_models_here(config)
    elif config.model.source == "pretrained" and not config.model.init_from \
            and not config.offline:
        issue = model_availability(config.model.name_or_path, config.model.revision)
        if issue:
            problems.append(issue)
    template = config.model.chat_template_path
    if template and not Path(template).expanduser().is_file():
        problems.append(problem(
            "model.chat_template_path", template, "no such file", "a Jinja chat template file",
            "check the path (relative paths are taken from the current directory), or "
            "model.chat_template_path=null for the tokenizer's own template"))
    if config.dataset.from_run and config.trains:
        config, issue = _synthesized_dataset(config)
        problems += issue
    if config.dataset.source == "local" and config.dataset.path:
        if not Path(config.dataset.path).expanduser().exists():
            problems.append(problem(
                "dataset.path", config.dataset.path, "no such file or directory",
                "a .jsonl/.json/.parquet/.arrow file or a save_to_disk directory",
                "check the path (relative paths are taken from the current directory)"))
    if config.model.quantization != "none" and config.stage != "merge":
        from lmalign.models import quantization_problem

        issue = quantization_problem(config.model, config.hardware)
        if issue:
            problems.append(issue)
    config, found = _hardware_here(config, explicit_keys)
    return config, problems + found


def _hardware_here(config: Config, explicit_keys: Collection[str]) -> tuple[Config, list[str]]:
    """What the hardware profile asks of this machine, checked on this machine."""
    import importlib.util

    hardware, problems = config.hardware, []
    if hardware.launch_config and not launch_file(hardware).exists():
        problems.append(problem("hardware.launch_config", hardware.launch_config, "no such file",
                                "a file in launch/ or a path", "check the name"))
    if hardware.liger_kernel and hardware.accelerator != "cuda":
        problems.append(problem("hardware.liger_kernel", True, "Liger's kernels are Triton GPU "
                                f"kernels and hardware={hardware.name} trains on the CPU",
                                "true on a CUDA profile", "hardware.liger_kernel=false"))
    elif hardware.liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        problems.append(problem("hardware.liger_kernel", True, "liger-kernel is not installed",
                                "true with liger-kernel installed", "pip install 'lmalign[liger]', "
                                "or hardware.liger_kernel=false"))
    sampling = config.method.sampling if config.trains else None
    if sampling is not None and sampling.vllm_mode != "none":
        key = f"method.{config.method.name}.vllm_mode"
        if hardware.accelerator != "cuda":
            problems.append(problem(key, sampling.vllm_mode, f"vLLM generates on GPUs and "
                                    f"hardware={hardware.name} trains on the CPU", "none here",
                                    f"{key}=none, or a GPU profile (hardware=a100)"))
        elif importlib.util.find_spec("vllm") is None:
            problems.append(problem(key, sampling.vllm_mode, "vLLM is not installed",
                                    f"{sampling.vllm_mode} with vLLM installed, or none",
                                    f"pip install vllm, or {key}=none"))
        if sampling.vllm_mode == "server" and not sampling.vllm_server_base_url:
            problems.append(problem(f"method.{config.method.name}.vllm_server_base_url", None,
                                    "vllm_mode=server sends generation to a running `trl "
                                    "vllm-serve`", "its URL", f"method.{config.method.name}."
                                    "vllm_server_base_url=http://127.0.0.1:8000"))
    if hardware.distributed == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append(problem("hardware.distributed", "deepspeed", "DeepSpeed is not installed",
                                "deepspeed with DeepSpeed installed, or fsdp",
                                "pip install 'lmalign[deepspeed]', or hardware=8gpu_fsdp"))
    if config.model.attn_implementation == "flash_attention_2" and \
            not models.flash_attention_installed():
        problems.append(problem("model.attn_implementation", "flash_attention_2",
                                "flash-attn is not installed", "sdpa, eager, or flash_attention_2 "
                                "with flash-attn installed", "pip install flash-attn, or "
                                "model.attn_implementation=sdpa"))
    problems += rendezvous_problems(hardware, os.environ)
    if hardware.accelerator != "cuda":
        return config, problems
    import torch

    if not torch.cuda.is_available():
        return config, problems + [problem(
            "hardware", hardware.name, "needs a CUDA GPU but none is visible",
            "hardware=cpu or cpu_ddp on a machine without GPUs", "hardware=cpu")]
    config, found = fit_to_gpus(config, explicit_keys, torch.cuda.device_count(),
                                torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
    return config, problems + found


def fit_to_gpus(config: Config, explicit_keys: Collection[str], visible: int,
                bf16_supported: bool, device_name: str) -> tuple[Config, list[str]]:
    """More processes per node than GPUs, and bf16 where the GPU has none: an error when the
    user asked for it, else the profile's value falls back with a one-line notice."""
    hardware, model, problems = config.hardware, config.model, []
    per_node = hardware.world_size // hardware.num_nodes
    if per_node > visible:
        fitted = visible * hardware.num_nodes
        per_step = hardware.per_device_batch_size * fitted
        if "hardware.world_size" in explicit_keys or config.method.global_batch_size % per_step:
            problems.append(problem(
                "hardware.world_size", hardware.world_size, f"{per_node} processes per node but "
                f"{visible} visible GPU(s)", f"at most {visible} per node here",
                f"hardware.world_size={fitted} (the global batch stays the same)"))
        else:
            log.warning("hardware=%s runs %d processes per node but %d GPU(s) are visible: "
                        "using world_size=%d; the global batch stays %d with more accumulation",
                        hardware.name, per_node, visible, fitted, config.method.global_batch_size)
            hardware = dataclasses.replace(hardware, world_size=fitted)
    bf16_keys = [key for key, value in (("hardware.precision", hardware.precision),
                                        ("model.dtype", precision_of(model.dtype))) if value == "bf16"]
    if bf16_keys and not bf16_supported:
        asked = [key for key in bf16_keys if key in explicit_keys]
        for key in asked:
            problems.append(problem(
                key, getattr(hardware if key.startswith("hardware") else model, key.split(".")[1]),
                f"this GPU ({device_name}) has no bf16 support", "fp16 or fp32 here",
                f"{key}={'fp16' if key.startswith('hardware') else 'float16'}, or hardware=t4"))
        if not asked:
            log.warning("%s has no bf16 support: training with fp16 mixed precision instead of "
                        "hardware=%s's bf16 (set hardware.precision=fp32 for full precision)",
                        device_name, hardware.name)
            hardware = dataclasses.replace(hardware, precision="fp16", supports_bf16=False)
            if model.dtype == "bfloat16":
                model = dataclasses.replace(model, dtype="auto")
    return dataclasses.replace(config, hardware=hardware, model=model), problems


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (HF_ENDPOINT) answers a connection within the timeout."""
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _synthesis_models_here(config: Config) -> list[str]:
    """stage=synthesize loads its generator and reward model, not model=: those given as hub
    ids must be in the cache or reachable (runs and directories are checked by the stage)."""
    found = []
    for key, name in (("synth.generator", config.synth.generator),
                      ("synth.reward_model", config.synth.reward_model)):
        if not name or name.startswith((".", "/", "~")) or name.count("/") != 1 \
                or Path(name).expanduser().exists() \
                or models.trained_start(name, config.runs_root) is not None:
            continue
        issue = model_availability(name, None, key)
        if issue:
            found.append(issue)
    return found


def _synthesized_dataset(config: Config) -> tuple[Config, list[str]]:
    """dataset=synthetic: the named stage=synthesize run's sft/ or preferences/ as the path, so
    the run's record names the files it trained on."""
    from lmalign.data import SYNTHESIZED_PARTS, synthesized_part

    dataset = config.dataset
    if dataset.format not in SYNTHESIZED_PARTS:
        return config, []  # reported by validate
    found = synthesized_part(dataset.from_run, dataset.format, config.runs_root)
    if found is None:
        part = SYNTHESIZED_PARTS[dataset.format]
        return config, [problem(
            "dataset.from_run", dataset.from_run, f"no synthesized {part}/ there (looked in "
            f"{Path(dataset.from_run) / part} and {Path(config.runs_root) / dataset.from_run / part})",
            "the run_name or directory of a finished stage=synthesize run",
            f"python -m lmalign stage=synthesize run_name={dataset.from_run} ... first, or fix "
            "the name")]
    if dataset.path and Path(dataset.path).expanduser().resolve() != found:
        return config, [problem("dataset.path", dataset.path, f"dataset.from_run="
                                f"{dataset.from_run} already names the data ({found})",
                                "one of the two", "dataset.path=null")]
    return dataclasses.replace(config, dataset=dataclasses.replace(dataset, path=str(found))), []


def model_availability(name_or_path: str, revision: str | None,
                       key: str = "model.name_or_path") -> str | None:
    """None when the model can be loaded here; otherwise the problem line saying how to fix it."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if (path / "config.json").exists():
            return None
        return problem(key, name_or_path, "directory has no config.json",
                       "a directory written by save_pretrained, or a hub model id",
                       f"point {key} at the model's directory")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        return problem(key, name_or_path, "no such directory, and not a hub id",
                       "a local model directory or a hub id like org/name",
                       "check the path")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision or "main")
    if isinstance(cached, str):
        return None
    if hub_offline():
        why = "HF_HUB_OFFLINE=1"
    elif not hub_reachable():
        why = "the hub cannot be reached from this machine"
    else:
        return None
    rev = revision or "main"
    return problem(
        key, name_or_path,
        f"revision {rev} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and {why}", "a model in the local cache, or a local directory with config.json",
        f"on a connected machine run `hf download {name_or_path} --revision {rev}` and copy "
        f"its HF_HOME here, or set {key}=/path/to/model")
