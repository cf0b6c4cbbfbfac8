"""Validate a composed config before anything heavy loads, reporting every problem at once:
its types (lmalign.type_errors), then values that are each fine but impossible together (one
checker per config section, below), then what this machine must have (lmalign.machine).

Over 400 lines on purpose: every rule that spans fields lives here, one checker per section,
so a user's several mistakes are all found in one pass and each rule has one home."""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from lmalign.config_tree import CONF_DIR
from lmalign.errors import UserError, problem
from lmalign.schema import (Config, EvalConfig, GenerateConfig, HarnessConfig, JudgeEvalConfig,
                            NemoConfig, precision_of)
from lmalign.type_errors import describe_type_errors

LAUNCHER_OPTIONS = Path(CONF_DIR) / "hydra" / "launcher"

CHECKPOINT_SELECTOR = re.compile(r"^(base|final|latest|all|checkpoint-\d+|\d+)$")


def validate(container: dict[str, Any], check_environment: bool = True,
             explicit_keys: Collection[str] = (), following: Collection[str] = ()) -> Config:
    """Typed Config from a resolved config dict, or UserError listing every problem.

    explicit_keys: the keys the user set on the command line. What this machine cannot do is an
    error for those and an announced fallback for profile defaults (docs/design.md, Errors and
    exit codes). following: keys whose value is another key's (`eval.seed: ${seed}`): a wrong
    value is reported once, at its source.
    """
    try:
        config = TypeAdapter(Config).validate_python(container)
    except ValidationError as exc:
        raise UserError(describe_type_errors(exc, container, following)) from None
    problems = check_combinations(config)
    if check_environment:
        from lmalign.machine import check_environment_for

        config, found = check_environment_for(config, explicit_keys)
        problems += found
    if problems:
        raise UserError(problems)
    return config


# ---------------------------------------------------------------------------------------------
# Combinations: values that are each fine but impossible together.


_LAUNCH_FILES = {"ddp": "ddp.yaml", "fsdp": "fsdp2.yaml", "deepspeed": "zero3.yaml"}


def check_combinations(config: Config) -> list[str]:
    """Every problem of the typed config's values together, one checker per section, in the
    order of Config's fields."""
    return [line for check in (_batch_problems, _data_format_problems, _method_problems,
                               _dataset_problems, _hardware_problems, _eval_problems,
                               _watch_problems, _report_problems, _synth_problems,
                               _cache_problems,
                               _run_name_problems)
            for line in check(config)]


def _batch_problems(config: Config) -> list[str]:
    """The method's global batch, made of the hardware profile's batches."""
    problems: list[str] = []
    method, hardware = config.method, config.hardware
    per_step = hardware.per_device_batch_size * hardware.world_size
    if method.global_batch_size % per_step:
        divisible = [n for n in (8, 16, 32, 64, 128, 256) if n % per_step == 0][:3]
        problems.append(problem(
            "method.global_batch_size", method.global_batch_size,
            f"not a multiple of hardware.per_device_batch_size x hardware.world_size "
            f"= {hardware.per_device_batch_size} x {hardware.world_size} = {per_step} "
            f"(hardware={hardware.name}), so gradient accumulation would not be whole",
            f"a positive multiple of {per_step}",
            f"method.global_batch_size={divisible[0] if divisible else per_step}"
            f" or hardware.per_device_batch_size=<a divisor of {method.global_batch_size}>"))
    return problems


def _data_format_problems(config: Config) -> list[str]:
    """What the method trains on against the format the dataset has."""
    problems: list[str] = []
    method, dataset = config.method, config.dataset
    if method.needs_preferences and dataset.format != "preference":
        problems.append(problem(
            "dataset", dataset.name,
            f"method={method.name} trains on preference pairs but dataset={dataset.name} has "
            f"format {dataset.format}", "a dataset with format preference "
            "(tiny_prefs, ultrafeedback_binarized, or local with dataset.format=preference)",
            "dataset=tiny_prefs"))
    if method.name == "dpo" and method.dpo is None:
        problems.append(problem("method.dpo", None, "missing the dpo block",
                                "a mapping of beta, loss_type, precompute_ref_log_probs",
                                "method=dpo"))
    if method.name == "reward" and method.reward is None:
        problems.append(problem("method.reward", None, "missing the reward block",
                                "a mapping of center_rewards_coefficient", "method=reward"))
    if method.needs_prompts and dataset.format != "prompt":
        problems.append(problem(
            "dataset", dataset.name,
            f"method={method.name} generates its own completions from prompts but "
            f"dataset={dataset.name} has format {dataset.format}", "a dataset with format prompt "
            "(tiny_prompts, or local with dataset.format=prompt: a prompt column, or chat "
            "messages)", "dataset=tiny_prompts, or dataset.format=prompt"))
    if not method.needs_prompts and dataset.format == "prompt":
        problems.append(problem(
            "dataset.format", "prompt", f"method={method.name} trains on given replies; prompts "
            "alone are for method=grpo and method=rloo", "messages, prompt_completion, text or "
            "preference", "method=grpo, or dataset=tiny_sft"))
    unpaired = dataset.format == "unpaired" or (dataset.format == "preference" and dataset.unpair)
    if method.name == "kto" and not unpaired:
        problems.append(problem(
            "dataset", dataset.name, f"method=kto trains on unpaired labelled replies but "
            f"dataset={dataset.name} has format {dataset.format}", "a dataset with format "
            "unpaired (tiny_unpaired, or local with dataset.format=unpaired: prompt, completion "
            "and label columns, or chat messages with a label), or preference pairs with "
            "dataset.unpair=true", "dataset=tiny_unpaired, or dataset.unpair=true"))
    if method.name != "kto" and unpaired:
        problems.append(problem(
            "dataset.format" if dataset.format == "unpaired" else "dataset.unpair",
            dataset.format if dataset.format == "unpaired" else True,
            f"unpaired labelled replies are method=kto's data, not method={method.name}'s",
            "method=kto", "method=kto, or another dataset"))
    problems += _prompt_template_problems(dataset)
    if dataset.unpair and dataset.format != "preference":
        problems.append(problem("dataset.unpair", True, "splits preference pairs, but dataset="
                                f"{dataset.name} has format {dataset.format}",
                                "true only with dataset.format=preference",
                                "dataset.unpair=false"))
    if method.name == "kto" and method.kto is None:
        problems.append(problem("method.kto", None, "missing the kto block",
                                "a mapping of beta, loss_type, desirable_weight, "
                                "undesirable_weight", "method=kto"))
    if method.needs_prompts and method.sampling is None:
        problems.append(problem(f"method.{method.name}", None, f"missing the {method.name} "
                                "block", "a mapping of num_generations, max_completion_length, "
                                "...", f"method={method.name}"))
    if not method.needs_preferences and dataset.format == "preference" and not dataset.unpair:
        problems.append(problem(
            "dataset", dataset.name,
            f"method={method.name} trains on single responses but dataset={dataset.name} holds "
            "preference pairs", "a dataset with format messages, prompt_completion or text",
            "dataset=tiny_sft, or method=dpo (method=reward) to train on preferences"))
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
    return problems


def _method_problems(config: Config) -> list[str]:
    """The method's own settings, and how they fit the model and the hardware."""
    problems: list[str] = []
    method = config.method
    if method.needs_prompts:
        problems += _reward_problems(config)
    if method.name in ("dpo", "reward", "grpo", "rloo", "kto") \
            and method.peft not in ("none", "lora"):
        problems.append(problem(
            "method.peft", method.peft, f"method={method.name} trains the full model or a LoRA "
            "adapter", f"none or lora with method={method.name}", "method.peft=lora"))
    if config.model.quantization != "none" and method.peft != "lora":
        problems.append(problem(
            "model.quantization", config.model.quantization,
            f"quantized weights cannot be trained directly (method.peft={method.peft}); "
            "QLoRA trains a LoRA adapter on them", "none, or 4bit/8bit with method.peft=lora",
            "method=lora, or model.quantization=none"))
    # Padding-free rows (and bfd packing) hold several sequences; transformers 5 keeps them apart
    # under every attention (a block-diagonal mask from position_ids where no attention mask is
    # given; tests/test_methods.py checks logits and loss curves). PEFT's prompt tuning drops
    # position_ids and puts its virtual tokens before the row: only the first sequence has them.
    flattens = method.padding_free or (method.packing and method.packing_strategy != "wrapped")
    if flattens and method.peft == "prompt_tuning":
        key, value = (("method.padding_free", True) if method.padding_free else
                      ("method.packing_strategy", method.packing_strategy))
        problems.append(problem(
            key, value, "prompt tuning puts its virtual tokens before a row, and a padding-free "
            "row holds several sequences (PEFT drops their position_ids)",
            "padding-free or bfd packing with method.peft=none or lora",
            "method.padding_free=false" if method.padding_free
            else "method.packing_strategy=wrapped"))
    if method.padding_free and not method.packing:
        problems.append(problem(
            "method.padding_free", True, "without packing, TRL flattens batches without "
            f"truncating them to method.max_length={method.max_length}",
            "padding-free rows through packing (bfd packs padding-free and truncates)",
            "method.packing=true method.packing_strategy=bfd, or method.padding_free=false"))
    context = config.model.architecture.get("max_position_embeddings")
    if isinstance(context, int) and method.max_length > context:
        problems.append(problem(
            "method.max_length", method.max_length, f"longer than model={config.model.name}'s "
            f"context of {context} positions (its max_position_embeddings)",
            f"at most {context}", f"method.max_length={min(context, 4096)}"))
    if method.max_steps == 0 or method.max_steps < -1:
        problems.append(problem(
            "method.max_steps", method.max_steps, "neither a number of steps nor -1",
            "-1 (train for method.num_train_epochs) or 1 or more steps",
            "method.max_steps=-1, or method.max_steps=100"))
    elif method.max_steps == -1 and method.num_train_epochs <= 0:
        problems.append(problem(
            "method.num_train_epochs", method.num_train_epochs,
            "with method.max_steps=-1 the epoch count decides the length of training",
            "a positive number", "method.num_train_epochs=1"))
    return problems


def template_fields(template: str) -> list[str]:
    """The {fields} of a str.format text ('' for a positional {}); ValueError if it is broken."""
    import string

    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _prompt_template_problems(dataset) -> list[str]:
    """dataset.prompt_template: for prompts only, a str.format text holding {prompt}."""
    template = dataset.prompt_template
    if template is None:
        return []
    fix = ("\"dataset.prompt_template='Question: {prompt} Answer:'\" (a template with a newline "
           "goes in a YAML file, as conf/experiment/grpo_gsm8k.yaml's)")
    if dataset.format != "prompt":
        return [problem("dataset.prompt_template", template, "wraps the prompts of online "
                        f"methods, but dataset={dataset.name} has format {dataset.format}",
                        "a template only with dataset.format=prompt",
                        "dataset.prompt_template=null")]
    try:
        fields = template_fields(template)
    except ValueError as exc:
        return [problem("dataset.prompt_template", template, f"not a format text: {exc}",
                        "text with {prompt} where the prompt goes ({{ and }} for braces)", fix)]
    if any(field == "" or field.isdigit() for field in fields):
        return [problem("dataset.prompt_template", template, "has a positional field ({} or "
                        "{0}); fields are named after columns", "text with {prompt} where the "
                        "prompt goes and {column} for other columns ({{ and }} for braces)", fix)]
    if "prompt" not in fields:
        return [problem("dataset.prompt_template", template, "has no {prompt}, so every prompt "
                        "would be the same text", "text with {prompt} where the prompt goes", fix)]
    return []


def _reward_problems(config: Config) -> list[str]:
    """method.rewards: at least one, each importable with settings it accepts; the group size
    divides the batch of completions."""
    method, problems = config.method, []
    sampling = method.sampling
    if sampling is not None and method.global_batch_size % sampling.num_generations:
        size, batch = sampling.num_generations, method.global_batch_size
        problems.append(problem(
            "method.global_batch_size", batch, f"counts completions, which come in groups of "
            f"method.{method.name}.num_generations={size}: {batch} is not a whole number of "
            "groups",
            f"a multiple of {size}", f"method.global_batch_size={max(size, batch // size * size)}"
            f" ({max(1, batch // size)} prompts per step), or method.{method.name}."
            f"num_generations=<a "
            f"divisor of {batch}>"))
    if not method.active_rewards:
        problems.append(problem(
            "method.rewards", method.rewards, f"method={method.name} needs at least one reward",
            "a mapping of name -> {_target_, weight, settings}",
            "+method.rewards.correct='{_target_: lmalign.rewards.tiny_task, weight: 1.0}'"))
    for name, spec in method.active_rewards.items():
        key = f"method.rewards.{name}"
        if not isinstance(spec.get("_target_"), str):
            problems.append(problem(f"{key}._target_", spec.get("_target_"), "each reward names "
                                    "its function", "a dotted path to a Python function",
                                    f"{key}._target_=lmalign.rewards.tiny_task"))
            continue
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(problem(f"{key}.weight", weight, "not a number", "a number (0 "
                                    "keeps it logged but out of the sum)", f"{key}.weight=1.0"))
        target = _importable(spec["_target_"])
        if isinstance(target, str):
            problems.append(problem(f"{key}._target_", spec["_target_"], target,
                                    "a function of (completions, **dataset columns), or a "
                                    "factory returning one (lmalign.rewards, trl.rewards)",
                                    "check the spelling and that its package is installed"))
            continue
        settings = {k: v for k, v in spec.items() if k not in ("_target_", "weight")}
        unaccepted = _unaccepted(target, settings)
        if unaccepted:
            problems.append(problem(f"{key}.{unaccepted[0]}", settings[unaccepted[0]],
                                    f"{spec['_target_']} takes no setting {unaccepted[0]!r}",
                                    _parameters(target), f"remove {key}.{unaccepted[0]}"))
            continue
        if not takes_completions(target):
            missing = _missing(target, settings)
            if missing:
                problems.append(problem(f"{key}.{missing[0]}", None, f"{spec['_target_']} "
                                        "makes a reward from settings and needs this one",
                                        _parameters(target), f"+{key}.{missing[0]}=<value>"))
        problems += _setting_value_problems(key, target, settings)
    return problems


def _setting_value_problems(key: str, target, settings: dict) -> list[str]:
    """Each setting's value against its parameter's annotation (pydantic, as for the config), so
    a bad regex or an unknown input_style stops the run here, not at the first generation."""
    import typing

    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # annotations this interpreter cannot resolve: the call itself decides
        return []
    problems = []
    for name, value in settings.items():
        if name not in hints:
            continue
        try:
            TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as exc:
            allowed = exc.errors()[0]["msg"].removeprefix("Value error, ").removeprefix(
                "Input should be ")
            problems.append(problem(f"{key}.{name}", value, f"not a value "
                                    f"{getattr(target, '__qualname__', target)} takes for {name}",
                                    allowed, f"set {key}.{name} to a value as allowed"))
        except PydanticSchemaGenerationError:
            continue
    return problems


def _importable(dotted: str):
    """The function at a dotted path, or why there is none."""
    import importlib

    module_name, _, attribute = dotted.rpartition(".")
    if not module_name:
        return "not a dotted path (module.function)"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"cannot import {module_name}: {exc}"
    target = getattr(module, attribute, None)
    if not callable(target):
        return f"{module_name} has no function {attribute}"
    return target


def takes_completions(target) -> bool:
    """A reward function (called with completions) rather than a factory that makes one from
    settings (TRL's get_soft_overlong_punishment)."""
    parameters = _signature(target)
    return parameters is not None and ("completions" in parameters
                                       or "completion_ids" in parameters)


def _signature(target):
    import inspect

    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None


def _unaccepted(target, settings: dict) -> list[str]:
    """Settings the target has no parameter for. A reward's **kwargs receive the dataset's
    columns, so a setting must name a parameter (a typo would vanish into them)."""
    parameters = _signature(target)
    if parameters is None or (not takes_completions(target) and any(
            p.kind == p.VAR_KEYWORD for p in parameters.values())):
        return []
    named = {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return [name for name in settings if name not in named]


def required_parameters(target) -> list[str]:
    """The parameters a call must name (no default); `config` is the run's, given by lmalign."""
    parameters = _signature(target) or {}
    return [name for name, p in parameters.items() if p.default is p.empty and name != "config"
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _missing(target, settings: dict) -> list[str]:
    return [name for name in required_parameters(target) if name not in settings]


def _parameters(target) -> str:
    parameters = _signature(target) or {}
    named = [n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
             and n not in ("completions", "completion_ids", "prompts", "config")]
    return "its settings: " + (", ".join(named) if named else "none")


def _dataset_problems(config: Config) -> list[str]:
    problems: list[str] = []
    dataset = config.dataset
    if dataset.from_run is not None:
        from lmalign.data import SYNTHESIZED_PARTS

        if dataset.format not in SYNTHESIZED_PARTS:
            problems.append(problem(
                "dataset.format", dataset.format, "a stage=synthesize run holds chat data (sft/) "
                "and preference pairs (preferences/)", " or ".join(SYNTHESIZED_PARTS),
                "dataset.format=messages, or dataset.format=preference for method=dpo/reward"))
        if dataset.source != "local":
            problems.append(problem("dataset.source", dataset.source, "dataset.from_run reads "
                                    "a run's files", "local", "dataset=synthetic"))
        return problems  # its path is set when the run starts
    if dataset.name == "synthetic" and not dataset.path:
        problems.append(problem("dataset.from_run", None, "dataset=synthetic reads what a "
                                "stage=synthesize run wrote", "that run's run_name or directory",
                                "dataset.from_run=<run_name>"))
    elif dataset.source in ("hub", "local") and not dataset.path:
        problems.append(problem(
            "dataset.path", None, f"dataset.source={dataset.source} needs a path",
            "a hub dataset id" if dataset.source == "hub" else "a file or directory",
            "dataset.path=/path/to/data.jsonl"))
    return problems


def _hardware_problems(config: Config) -> list[str]:
    problems: list[str] = []
    hardware = config.hardware
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
    if not hardware.supports_bf16 and "bf16" in (hardware.precision, precision_of(config.model.dtype)):
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
    return problems


def _eval_problems(config: Config) -> list[str]:
    """The shared evaluation keys, then each selected backend's block."""
    problems = []
    evaluation = config.eval
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
    generate = evaluation.generate
    if generate is not None:
        problems += _generate_problems(generate, config)
    if evaluation.judge is not None:
        problems += _judge_problems(evaluation, config)
    problems += _reward_eval_problems(evaluation, config)
    if config.eval.revisions and (config.model.source != "pretrained" or config.model.init_from
                                  or config.stage != "eval"):
        problems.append(problem(
            "eval.revisions", config.eval.revisions, "revisions are versions of a hub model, "
            f"evaluated with stage=eval (here stage={config.stage}, model={config.model.name})",
            "stage=eval with a hub model (model=smollm2_1.7b ...)",
            "stage=eval model=<hub model> eval.revisions=[...], or eval.revisions=[]"))
    return problems


def _generate_problems(generate: GenerateConfig, config: Config) -> list[str]:
    problems = []
    if generate.temperature == 0 and generate.num_samples > 1:
        problems.append(problem(
            "eval.generate.num_samples", generate.num_samples, "greedy decoding "
            "(eval.generate.temperature=0) gives the same answer every time", "1 when greedy, "
            "more when sampling", "eval.generate.num_samples=1, or eval.generate.temperature=0.7"))
    if generate.engine == "external" and not generate.server_address:
        problems.append(problem(
            "eval.generate.server_address", None, "engine=external answers through a server you "
            "run, at an address lmalign needs", "its OpenAI base URL",
            "eval.generate.server_address=http://<host>:<port>/v1"))
    if generate.engine not in ("auto", "hf") and config.method.peft == "prompt_tuning" \
            and config.trains:
        problems.append(problem(
            "eval.generate.engine", generate.engine, "this run trains a prompt-tuning adapter, "
            "which no inference server serves", "hf (or auto, which picks hf for it)",
            "eval.generate.engine=hf"))
    return problems


def _judge_problems(evaluation: EvalConfig, config: Config) -> list[str]:
    judge = evaluation.judge
    problems = []
    if evaluation.generate is None:
        others = [b for b in evaluation.backends if b != "judge"]
        problems.append(problem(
            "eval", f"[{','.join(evaluation.backends)}]", "eval=judge grades the answers "
            "eval=generate makes, and generate is not selected", "judge together with generate",
            f"'eval=[{','.join(others + ['generate', 'judge'])}]'"))
    problems += _unnamed_judge_problems(judge, "eval.judge", "eval=judge")
    if _is_pairwise(judge.rubric) and evaluation.generate is not None:
        from lmalign.evaluation import judge as judging

        if judging.in_another_run(judge.baseline):  # its answers are there before training
            problems += judging.baseline_problems([], evaluation, Path(config.runs_root),
                                                  config.hardware, config.runs_root)
        elif config.trains and judge.baseline not in evaluation.checkpoint_selectors \
                and "all" not in evaluation.checkpoint_selectors:
            problems.append(problem(
                "eval.judge.baseline", judge.baseline, "pairwise judging compares every "
                f"checkpoint with the baseline's answers, and eval.checkpoints="
                f"{evaluation.checkpoint_selectors} does not generate them", "a checkpoint "
                "this run evaluates, or <run>/<checkpoint> of another run",
                f"eval.checkpoints=[{judge.baseline},final]"))
    return problems


def _reward_eval_problems(evaluation: EvalConfig, config: Config) -> list[str]:
    """A training run's backends against what it trains: a reward model scores text and
    generates nothing (other runs' models are checked once chosen: evaluation.target_problems)."""
    if not config.trains:
        return []
    others = [b for b in evaluation.backends if b != "reward"]
    problems = []
    if config.method.name == "reward" and others:
        problems.append(problem(
            "eval", f"[{','.join(evaluation.backends)}]", "method=reward trains a reward model: "
            f"it scores text and generates nothing, so {', '.join(others)} cannot evaluate it",
            "eval=reward (or eval=none)", "eval=reward"))
    if config.method.name != "reward" and evaluation.reward is not None:
        problems.append(problem(
            "eval", f"[{','.join(evaluation.backends)}]", f"eval=reward scores reward models "
            f"and method={config.method.name} trains a language model",
            "eval=reward with method=reward", f"eval=[{','.join(others) or 'harness'}], or "
            "method=reward"))
    if evaluation.reward is not None and config.method.name == "reward":
        from lmalign.evaluation import reward

        problems += reward.source_problems(config.dataset, evaluation.reward.pairs)
    return problems


def _is_pairwise(rubric: str) -> bool:
    """A user's rubric file may be pairwise too; a rubric that does not load is reported by
    the judge's own check."""
    from lmalign.evaluation import rubrics

    try:
        return rubrics.load(rubric).kind == "pairwise"
    except UserError:
        return False


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
    from lmalign.evaluation import nemo_skills

    problems = []
    if not nemo.benchmarks:
        problems.append(problem("eval.nemo.benchmarks", nemo.benchmarks, "no benchmarks",
                                "NeMo-Skills benchmarks",
                                "eval.nemo.benchmarks=[gsm8k:4,ifeval]"))
    else:
        try:
            nemo_skills.parse_benchmarks(nemo.benchmark_spec)
        except UserError as exc:
            problems += exc.problems
    if nemo.server == "external" and not nemo.server_address:
        problems.append(problem("eval.nemo.server_address", None, "eval.nemo.server=external "
                                "sends the benchmarks' requests to a server you run",
                                "its OpenAI base URL",
                                "eval.nemo.server_address=http://<host>:8000/v1"))
    return problems


def _watch_problems(config: Config) -> list[str]:
    problems = []
    if config.stage == "watch" and not config.run_name:
        problems.append(problem("run_name", None, "stage=watch watches a training run",
                                "the run_name of a training run", "stage=watch run_name=<run>"))
    launchers = sorted(p.stem for p in LAUNCHER_OPTIONS.glob("*.yaml"))
    if config.watch.submit_to is not None and config.watch.submit_to not in launchers:
        problems.append(problem(
            "watch.submit_to", config.watch.submit_to, "not a launcher option in "
            f"{LAUNCHER_OPTIONS}", f"null (evaluate in the watcher) or {', '.join(launchers)}",
            "watch.submit_to=slurm, or add your cluster's file there"))
    return problems


def _synth_problems(config: Config) -> list[str]:
    """stage=synthesize's models are named and its patterns compile (whether the models exist
    is checked by the stage, which reads runs_root)."""
    if config.stage != "synthesize":
        return []
    synth, problems = config.synth, []
    needed = [("generator", "synth.generator=<an instruct run, model directory or hub id>")]
    if synth.scorer == "reward_model":
        needed.append(("reward_model", "synth.reward_model=<a method=reward run, directory or "
                       "hub id>, or synth.scorer=judge"))
    for key, fix in needed:
        if not getattr(synth, key):
            problems.append(problem(f"synth.{key}", None, "stage=synthesize needs it",
                                    "a run name, a model directory or a hub id", fix))
    if synth.scorer == "judge":
        problems += _synth_judge_problems(synth.judge)
    from lmalign.evaluation import prompts

    if synth.engine == "external" and not synth.server_address:
        problems.append(problem("synth.server_address", None, "synth.engine=external samples "
                                "from a server you run", "its OpenAI base URL",
                                "synth.server_address=http://<host>:<port>/v1"))
    for name in synth.filters.decontaminate:
        if name not in prompts.NAMED and not Path(name).expanduser().exists():
            problems.append(problem("synth.filters.decontaminate", name, "no such named prompt "
                                    "set or file", f"{', '.join(prompts.NAMED)}, or a prompts "
                                    "file (a prompt or turns column)", "fix the name or path, or "
                                    "drop it from the list"))
    for pattern in synth.filters.exclude_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(problem("synth.filters.exclude_patterns", pattern,
                                    f"not a regular expression ({exc})", "Python regexes",
                                    "escape special characters, e.g. '\\?' for a question mark"))
    return problems


def _unnamed_judge_problems(judge: JudgeEvalConfig, key: str, user: str) -> list[str]:
    """A judge to ask: its model, and its base URL unless lmalign serves it."""
    return [problem(f"{key}.{name}", None, f"{user} needs a judge to ask",
                    "the judge model's name and its OpenAI-compatible base URL",
                    f"{key}.model=gpt-4.1 {key}.base_url=https://api.openai.com/v1")
            for name in (("model",) if judge.server else ("model", "base_url"))
            if not getattr(judge, name)]


def _synth_judge_problems(judge: JudgeEvalConfig) -> list[str]:
    """synth.scorer=judge grades each answer alone: a single or criteria rubric, a judge named."""
    from lmalign.evaluation import rubrics

    problems = _unnamed_judge_problems(judge, "synth.judge", "synth.scorer=judge")
    try:
        kind = rubrics.load(judge.rubric, "synth.judge.rubric").kind
    except UserError as exc:
        return problems + exc.problems
    if kind == "pairwise":
        problems.append(problem("synth.judge.rubric", judge.rubric, "a pairwise rubric compares "
                                "two answers, and synthesis grades each answer alone",
                                "mt_bench, answer_quality or a single or criteria rubric file",
                                "synth.judge.rubric=mt_bench"))
    return problems


def _report_problems(config: Config) -> list[str]:
    problems = []
    if config.stage == "report" and not (config.run_name or config.report.dir):
        problems.append(problem("report.dir", None, "stage=report needs a directory to collate",
                                "a sweep directory (multirun/<date>/<time>) or a run",
                                "report.dir=<sweep dir>, or run_name=<run>"))
    return problems


def _run_name_problems(config: Config) -> list[str]:
    problems = []
    if config.run_name is not None and (
        not config.run_name or "/" in config.run_name or config.run_name.startswith(".")
    ):
        problems.append(problem("run_name", config.run_name, "not a plain directory name",
                                "letters, digits, - _ . (no /)", "run_name=my_run"))
    return problems


def _cache_problems(config: Config) -> list[str]:
    problems = []
    if config.stage in ("cache_prepare", "cache_verify") and not config.cache.dir:
        problems.append(problem("cache.dir", None, f"stage={config.stage} needs the cache "
                                "directory", "a directory (created if missing)",
                                f"stage={config.stage} cache.dir=/path/to/lmalign-cache"))
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
