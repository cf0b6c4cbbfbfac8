"""Validate a composed config before anything heavy loads, reporting every problem at once."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import socket
import types
import typing
from pathlib import Path
from collections.abc import Collection
from typing import Any

from pydantic import TypeAdapter, ValidationError

from lmalign import models
from lmalign.launch import launch_file, rendezvous_problems
from lmalign.errors import UserError, problem
from lmalign.schema import Config, EvalConfig, HarnessConfig, NemoConfig

log = logging.getLogger(__name__)
LAUNCHER_OPTIONS = Path(__file__).resolve().parent.parent / "conf" / "hydra" / "launcher"

CHECKPOINT_SELECTOR = re.compile(r"^(base|final|latest|all|checkpoint-\d+|\d+)$")


def validate(container: dict[str, Any], check_environment: bool = True,
             explicit_keys: Collection[str] = ()) -> Config:
    """Typed Config from a resolved config dict, or UserError listing every problem.

    explicit_keys: the keys the user set on the command line. What this machine cannot do is an
    error for those and an announced fallback for profile defaults (docs/design.md, Errors and
    exit codes).
    """
    try:
        config = TypeAdapter(Config).validate_python(container)
    except ValidationError as exc:
        raise UserError(describe_type_errors(exc, container)) from None
    problems = check_combinations(config)
    if check_environment:
        config, found = check_environment_for(config, explicit_keys)
        problems += found
    if problems:
        raise UserError(problems)
    return config


# ---------------------------------------------------------------------------------------------
# Type errors, translated from pydantic into key / value / allowed / fix.


def _walk(loc: tuple) -> tuple[list[str], Any, type | None]:
    """Follow an error location through the schema: (dotted key parts, annotation, owning class).

    Stops at pydantic's union-member tags ('int', 'list[int]'), which are not config keys.
    """
    parts: list[str] = []
    annotation: Any = Config
    owner: type | None = None
    for element in loc:
        cls = _dataclass_in(annotation)
        if cls is not None and isinstance(element, str):
            hints = typing.get_type_hints(cls)
            owner = cls
            parts.append(element)
            if element not in hints:
                return parts, None, owner
            annotation = hints[element]
        elif isinstance(element, int) or _is_mapping(annotation):
            parts.append(str(element))
            annotation = _item_type(annotation)
        else:
            break
    return parts, annotation, owner


def _dataclass_in(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _is_mapping(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


def _item_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[-1] if args else Any


def _describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(_describe_type(a) for a in members)
        return text + (" or null" if type(None) in typing.get_args(annotation) else "")
    if origin is list:
        return f"a list of {_describe_type(typing.get_args(annotation)[0])}s"
    if origin is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if annotation in names:
        return names[annotation]
    if dataclasses.is_dataclass(annotation):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(annotation))
    return str(annotation)


def _example(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str(typing.get_args(annotation)[0])
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is not None and members and origin is not list and origin is not dict:
        return _example(members[0])
    return {int: "8", float: "0.0002", bool: "true", str: "NAME"}.get(annotation, "<value>")


def describe_type_errors(exc: ValidationError, container: dict[str, Any]) -> list[str]:
    problems: dict[str, str] = {}
    for err in exc.errors():
        parts, annotation, owner = _walk(err["loc"])
        key = ".".join(parts)
        if key in problems:
            continue  # a union reports once per member; one line per key is enough
        value = err["input"] if err["type"] != "missing_argument" else "<missing>"
        if err["type"] == "unexpected_keyword_argument":
            known = [f.name for f in dataclasses.fields(owner)] if owner else []
            close = difflib.get_close_matches(parts[-1], known, n=1)
            prefix = ".".join(parts[:-1])
            fix = f"did you mean {prefix}.{close[0]}?" if close else f"remove {key}"
            problems[key] = problem(
                key, value, "unknown key", f"the keys of {prefix or 'the config'}: "
                + ", ".join(known), fix)
        elif err["type"] in ("missing_argument", "missing"):
            problems[key] = problem(
                key, value, "missing", _describe_type(annotation),
                f"add `{parts[-1]}:` to the YAML option or pass +{key}=...")
        else:
            problems[key] = problem(
                key, _lookup(container, parts, err["input"]), f"not valid ({err['msg'].lower()})",
                _describe_type(annotation), f"{key}={_example(annotation)}")
    return list(problems.values())


def _lookup(container: dict, parts: list[str], fallback: Any) -> Any:
    node: Any = container
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return fallback
    return node


# ---------------------------------------------------------------------------------------------
# Combinations: values that are each fine but impossible together.


_LAUNCH_FILES = {"ddp": "ddp.yaml", "fsdp": "fsdp2.yaml", "deepspeed": "zero3.yaml"}


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def check_combinations(config: Config) -> list[str]:
    problems: list[str] = []
    method, hardware, dataset, evaluation = config.method, config.hardware, config.dataset, config.eval

    per_step = hardware.per_device_batch_size * hardware.world_size
    if method.global_batch_size <= 0 or method.global_batch_size % per_step:
        divisible = [n for n in (8, 16, 32, 64, 128, 256) if n % per_step == 0][:3]
        problems.append(problem(
            "method.global_batch_size", method.global_batch_size,
            f"not a multiple of hardware.per_device_batch_size x hardware.world_size "
            f"= {hardware.per_device_batch_size} x {hardware.world_size} = {per_step} "
            f"(hardware={hardware.name}), so gradient accumulation would not be whole",
            f"a positive multiple of {per_step}",
            f"method.global_batch_size={divisible[0] if divisible else per_step}"
            f" or hardware.per_device_batch_size=<a divisor of {method.global_batch_size}>"))

    if method.needs_preferences and dataset.format != "preference":
        problems.append(problem(
            "dataset", dataset.name,
            f"method={method.name} trains on preference pairs but dataset={dataset.name} has "
            f"format {dataset.format}", "a dataset with format preference "
            "(tiny_prefs, ultrafeedback_binarized, or local with dataset.format=preference)",
            "dataset=tiny_prefs"))
    if method.needs_preferences and method.dpo is None:
        problems.append(problem("method.dpo", None, "missing the dpo block",
                                "a mapping of beta, loss_type, precompute_ref_log_probs",
                                "method=dpo"))
    if not method.needs_preferences and dataset.format == "preference":
        problems.append(problem(
            "dataset", dataset.name,
            f"method={method.name} trains on single responses but dataset={dataset.name} holds "
            "preference pairs", "a dataset with format messages, prompt_completion or text",
            "dataset=tiny_sft, or method=dpo for preference training"))
    if method.assistant_only_loss and dataset.format != "messages":
        problems.append(problem(
            "method.assistant_only_loss", True,
            f"needs conversational data but dataset={dataset.name} has format {dataset.format}",
            "true only with dataset.format=messages",
            "method.assistant_only_loss=false"))
    if method.completion_only_loss and dataset.format != "prompt_completion":
        problems.append(problem(
            "method.completion_only_loss", True,
            f"needs prompt/completion data but dataset={dataset.name} has format {dataset.format}",
            "true only with dataset.format=prompt_completion",
            "method.completion_only_loss=null"))
    if method.name == "dpo" and method.peft not in ("none", "lora"):
        problems.append(problem(
            "method.peft", method.peft, "DPO trains the full model or a LoRA adapter",
            "none or lora with method=dpo", "method.peft=lora"))
    if config.model.quantization != "none" and method.peft != "lora":
        problems.append(problem(
            "model.quantization", config.model.quantization,
            f"quantized weights cannot be trained directly (method.peft={method.peft}); "
            "QLoRA trains a LoRA adapter on them", "none, or 4bit/8bit with method.peft=lora",
            "method=lora, or model.quantization=none"))
    flattens = method.padding_free or (method.packing and method.packing_strategy != "wrapped")
    attention = models.attention(config.model, hardware, announce=False)
    if flattens and attention != "flash_attention_2":
        key, value = (("method.padding_free", True) if method.padding_free else
                      ("method.packing_strategy", method.packing_strategy))
        problems.append(problem(
            key, value, "padding-free batches put several sequences in one row, which only "
            f"flash attention keeps apart (with {attention} they attend "
            "to each other)", "padding-free or bfd packing with "
            "model.attn_implementation=flash_attention_2",
            "model.attn_implementation=flash_attention_2 on a GPU, or "
            + ("method.padding_free=false" if method.padding_free
               else "method.packing_strategy=wrapped")))
    if method.max_steps <= 0 and method.num_train_epochs <= 0:
        problems.append(problem(
            "method.num_train_epochs", method.num_train_epochs,
            "with method.max_steps=-1 the epoch count decides the length of training",
            "a positive number", "method.num_train_epochs=1"))

    if dataset.source in ("hub", "local") and not dataset.path:
        problems.append(problem(
            "dataset.path", None, f"dataset.source={dataset.source} needs a path",
            "a hub dataset id" if dataset.source == "hub" else "a file or directory",
            "dataset.path=/path/to/data.jsonl"))

    if hardware.world_size < 1:
        problems.append(problem("hardware.world_size", hardware.world_size, "no processes",
                                "1 or more", "hardware.world_size=1"))
    if hardware.num_nodes < 1 or hardware.world_size % hardware.num_nodes:
        problems.append(problem(
            "hardware.num_nodes", hardware.num_nodes, f"hardware.world_size={hardware.world_size} "
            "processes do not divide evenly over the nodes", "a divisor of hardware.world_size "
            "(world_size counts the processes on all nodes)",
            f"hardware.world_size={hardware.world_size * max(hardware.num_nodes, 1)} for "
            f"{hardware.world_size} per node"))
    elif hardware.node_rank is not None and not 0 <= hardware.node_rank < hardware.num_nodes:
        problems.append(problem("hardware.node_rank", hardware.node_rank, "not a node of this run",
                                f"0 to {hardware.num_nodes - 1}", "hardware.node_rank=0"))
    if hardware.world_size > 1 and hardware.distributed == "none":
        problems.append(problem(
            "hardware.distributed", "none", f"{hardware.world_size} processes need a distributed "
            "kind", "ddp, fsdp or deepspeed with world_size > 1", "hardware=cpu_ddp, "
            "hardware=8gpu_fsdp, or hardware.distributed=ddp hardware.launch_config=launch/ddp.yaml"))
    if hardware.distributed != "none" and not hardware.launch_config:
        problems.append(problem(
            "hardware.launch_config", None, f"distributed={hardware.distributed} is launched with "
            "an accelerate config file", "a file in launch/ (ddp.yaml, fsdp2.yaml, zero3.yaml)",
            f"hardware.launch_config=launch/{_LAUNCH_FILES[hardware.distributed]}"))
    if hardware.accelerator == "cpu" and hardware.distributed in ("fsdp", "deepspeed"):
        # Measured: accelerate 1.15 with ACCELERATE_USE_CPU=1 ignores --use_fsdp/--use_deepspeed
        # and every rank trains plain DDP over gloo.
        problems.append(problem(
            "hardware.distributed", hardware.distributed, "FSDP and DeepSpeed need GPUs; on a CPU "
            "accelerate would silently train plain DDP instead", "ddp (or none) on a CPU",
            "hardware=cpu_ddp"))
    if not hardware.supports_bf16 and "bf16" in (hardware.precision, _short(config.model.dtype)):
        key, value = (("model.dtype", config.model.dtype) if config.model.dtype == "bfloat16"
                      else ("hardware.precision", hardware.precision))
        problems.append(problem(
            key, value, f"hardware={hardware.name} has no bf16 support",
            "float16/float32 weights and fp16/fp32 precision on this hardware",
            f"{key}={'float16' if key == 'model.dtype' else 'fp16'}"))
    if hardware.accelerator == "cpu" and hardware.precision == "fp16":
        problems.append(problem(
            "hardware.precision", "fp16", "fp16 mixed precision needs a GPU",
            "fp32 or bf16 on CPU", "hardware.precision=fp32"))

    problems += _eval_problems(evaluation)
    if config.eval.revisions and (config.model.source != "pretrained" or config.model.init_from
                                  or config.stage != "eval"):
        problems.append(problem(
            "eval.revisions", config.eval.revisions, "revisions are versions of a hub model, "
            f"evaluated with stage=eval (here stage={config.stage}, model={config.model.name})",
            "stage=eval with a hub model (model=smollm2_1.7b ...)",
            "stage=eval model=<hub model> eval.revisions=[...], or eval.revisions=[]"))
    if config.stage == "watch" and not config.run_name:
        problems.append(problem("run_name", None, "stage=watch watches a training run",
                                "the run_name of a training run", "stage=watch run_name=<run>"))
    launchers = sorted(p.stem for p in LAUNCHER_OPTIONS.glob("*.yaml"))
    if config.watch.submit_to is not None and config.watch.submit_to not in launchers:
        problems.append(problem(
            "watch.submit_to", config.watch.submit_to, "not a launcher option in "
            f"{LAUNCHER_OPTIONS}", f"null (evaluate in the watcher) or {', '.join(launchers)}",
            "watch.submit_to=slurm, or add your cluster's file there"))
    if config.stage == "report" and not (config.run_name or config.report.dir):
        problems.append(problem("report.dir", None, "stage=report needs a directory to collate",
                                "a sweep directory (multirun/<date>/<time>) or a run",
                                "report.dir=<sweep dir>, or run_name=<run>"))
    problems += _cache_problems(config)
    if config.run_name is not None and (
        not config.run_name or "/" in config.run_name or config.run_name.startswith(".")
    ):
        problems.append(problem("run_name", config.run_name, "not a plain directory name",
                                "letters, digits, - _ . (no /)", "run_name=my_run"))
    return problems


def _eval_problems(evaluation: EvalConfig) -> list[str]:
    """The shared evaluation keys, then each selected backend's block."""
    problems = []
    if evaluation.backends:
        bad = [c for c in evaluation.checkpoint_selectors if not CHECKPOINT_SELECTOR.match(c)]
        if bad:
            problems.append(problem(
                "eval.checkpoints", bad, "unknown checkpoint selector",
                "base, final, latest, all, checkpoint-<step> or <step>",
                "eval.checkpoints=[base,final]"))
    if evaluation.harness is not None:
        problems += _harness_problems(evaluation.harness)
    if evaluation.nemo is not None:
        problems += _nemo_problems(evaluation.nemo)
    return problems


def _harness_problems(harness: HarnessConfig) -> list[str]:
    problems = []
    if not harness.tasks:
        problems.append(problem("eval.harness.tasks", [], "no tasks to evaluate",
                                "lm-eval task or group names", "eval.harness.tasks=[tiny_mc]"))
    if harness.fewshot_as_multiturn and not harness.apply_chat_template:
        problems.append(problem(
            "eval.harness.fewshot_as_multiturn", True, "few-shot turns need the chat template",
            "true only with eval.harness.apply_chat_template=true",
            "eval.harness.fewshot_as_multiturn=null"))
    if any(n < 0 for n in harness.fewshot_values):
        problems.append(problem("eval.harness.num_fewshot", harness.num_fewshot, "negative",
                                "0 or more, or a list of them", "eval.harness.num_fewshot=0"))
    return problems


def _nemo_problems(nemo: NemoConfig) -> list[str]:
    from lmalign.evaluation import nemo as backend

    problems = []
    if not nemo.benchmarks:
        problems.append(problem("eval.nemo.benchmarks", nemo.benchmarks, "no benchmarks",
                                "NeMo-Skills benchmarks",
                                "eval.nemo.benchmarks=[gsm8k:4,ifeval]"))
    else:
        try:
            backend.parse_benchmarks(nemo.benchmark_spec)
        except UserError as exc:
            problems += exc.problems
    if nemo.server == "external" and not nemo.server_address:
        problems.append(problem("eval.nemo.server_address", None, "eval.nemo.server=external "
                                "sends the benchmarks' requests to a server you run",
                                "its OpenAI base URL",
                                "eval.nemo.server_address=http://<host>:8000/v1"))
    return problems


def _cache_problems(config: Config) -> list[str]:
    problems = []
    if config.stage in ("cache_prepare", "cache_verify") and not config.cache.dir:
        problems.append(problem("cache.dir", None, f"stage={config.stage} needs the cache "
                                "directory", "a directory (created if missing)",
                                f"stage={config.stage} cache.dir=/path/to/lmalign-cache"))
    if config.offline and not config.cache.dir:
        problems.append(problem("cache.dir", None, "offline=true reads every model and dataset "
                                "from the offline cache", "the directory stage=cache_prepare "
                                "filled", "offline=true cache.dir=/path/to/lmalign-cache"))
    if config.offline and config.stage == "cache_prepare":
        problems.append(problem("offline", True, "stage=cache_prepare fetches from the hub",
                                "offline=false on a connected machine",
                                "drop offline=true for the prepare"))
    if config.cache.retries < 0:
        problems.append(problem("cache.retries", config.cache.retries, "negative",
                                "0 or more attempts after the first", "cache.retries=3"))
    if config.cache.pack_part_gib is not None and config.cache.pack_part_gib <= 0:
        problems.append(problem("cache.pack_part_gib", config.cache.pack_part_gib,
                                "not a size", "null (one file) or a size in GiB",
                                "cache.pack_part_gib=4"))
    return problems


# ---------------------------------------------------------------------------------------------
# Environment: what must exist on this machine for the run to go ahead.


def check_environment_for(config: Config,
                          explicit_keys: Collection[str] = ()) -> tuple[Config, list[str]]:
    """(the config with announced fallbacks applied, problems)."""
    problems: list[str] = []
    if not config.loads_weights or config.dry_run:
        return config, problems
    # offline=true: the run's needs are checked against the cache's manifest instead.
    if config.model.source == "pretrained" and not config.model.init_from and not config.offline:
        issue = model_availability(config.model.name_or_path, config.model.revision)
        if issue:
            problems.append(issue)
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
                                        ("model.dtype", _short(model.dtype))) if value == "bf16"]
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def model_availability(name_or_path: str, revision: str | None) -> str | None:
    """None when the model can be loaded here; otherwise the problem line saying how to fix it."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if (path / "config.json").exists():
            return None
        return problem("model.name_or_path", name_or_path, "directory has no config.json",
                       "a directory written by save_pretrained, or a hub model id",
                       "point model.name_or_path at the model's directory")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        return problem("model.name_or_path", name_or_path, "no such directory, and not a hub id",
                       "a local model directory or a hub id like org/name",
                       "check the path")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision or "main")
    if isinstance(cached, str):
        return None
    if hub_offline():
        why = "HF_HUB_OFFLINE=1"
    elif not _hub_reachable():
        why = "the hub cannot be reached from this machine"
    else:
        return None
    rev = revision or "main"
    return problem(
        "model.name_or_path", name_or_path,
        f"revision {rev} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and {why}", "a model in the local cache, or a local directory with config.json",
        f"on a connected machine run `hf download {name_or_path} --revision {rev}` and copy "
        "its HF_HOME here, or set model.name_or_path=/path/to/model")
