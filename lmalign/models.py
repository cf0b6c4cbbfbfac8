"""Model and tokenizer loading: the embedded tiny model and hub/local models share one path.

A run starts from full weights (the configured model, or an earlier run's final/) and optionally
an adapter trained on them (`model.init_from` pointing at a LoRA or prompt-tuning run). Adapters
load through PEFT on top of the base named in their own adapter_config.json, so any PEFT adapter
directory works, lmalign's or not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmalign import embedded, rundir
from lmalign.errors import UserError, problem
from lmalign.schema import PRECISION_DTYPE, Config, HardwareConfig, ModelConfig, PeftKind

log = logging.getLogger(__name__)



def resolve(model: ModelConfig, cache_dir: str) -> str:
    """What from_pretrained should load: the built embedded model's directory, or the hub id/path."""
    if model.source == "embedded":
        return str(embedded.materialize(model.name, model.architecture, model.seed,
                                        Path(cache_dir)))
    return model.name_or_path


ADAPTER_CONFIG = "adapter_config.json"
# What a model computes: next-token logits, or one score per sequence (a reward model).
Head = Literal["causal_lm", "reward"]
_PEFT_KINDS = {"LORA": "lora", "PROMPT_TUNING": "prompt_tuning"}


@dataclass(frozen=True)
class Start:
    """Where a run's weights come from: full weights, and optionally an adapter trained on them."""

    path: str                 # full weights: a directory or a hub id
    revision: str | None
    tokenizer: str            # where the tokenizer (and chat template) is read from
    adapter: str | None = None
    adapter_kind: PeftKind = "none"

    @property
    def label(self) -> str:
        return self.adapter or self.path


def adapter_config(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / ADAPTER_CONFIG
    return json.loads(file.read_text()) if file.exists() else None


def adapter_kind(info: dict[str, Any]) -> str:
    return _PEFT_KINDS.get(info.get("peft_type", ""), str(info.get("peft_type", "unknown")).lower())


def run_candidates(name: str, runs_root: str) -> tuple[Path, Path]:
    """Where a run named on the command line may be: the path as given, then under runs_root."""
    return Path(name).expanduser(), Path(runs_root).expanduser() / name


def init_from_dir(init_from: str, runs_root: str) -> Path | None:
    """An earlier run's final/ (given its run_name or directory), or a model directory itself."""
    for candidate in run_candidates(init_from, runs_root):
        for directory in (candidate / "final", candidate):
            if (directory / "config.json").exists() or (directory / ADAPTER_CONFIG).exists():
                return directory.resolve()
    return None


def trained_start(init_from: str, runs_root: str) -> Start | None:
    """What model.init_from names (the one reading of it: training, the plan and the offline
    cache all ask here): full weights, or an adapter on its base; None before it has trained."""
    found = init_from_dir(init_from, runs_root)
    if found is None:
        return None
    info = adapter_config(found)
    if info is None:
        return Start(str(found), None, tokenizer=str(found))
    return Start(info["base_model_name_or_path"], info.get("revision"), tokenizer=str(found),
                 adapter=str(found), adapter_kind=adapter_kind(info))


def starting_point(config: Config) -> Start:
    model = config.model
    if model.init_from is None:
        path = resolve(model, config.cache.build_dir)
        revision = model.revision if model.source == "pretrained" else None
        return Start(path, revision, tokenizer=path)
    start = trained_start(model.init_from, config.runs_root)
    if start is None:
        raise UserError(problem(
            "model.init_from", model.init_from, "no trained model there: neither a run with a "
            f"final/ (looked in {model.init_from} and {Path(config.runs_root) / model.init_from}) "
            "nor a model or adapter directory", "a run_name under runs_root, a run directory, or "
            "a directory with config.json or adapter_config.json",
            "train that run first (stage=train), or fix the name"))
    return start


def start_problems(start: Start, config: Config) -> list[str]:
    """Starting points a method cannot build on, each with the way round it."""
    peft, kind, key = config.method.peft, start.adapter_kind, "model.init_from"
    problems = []
    if kind == "prompt_tuning" and peft != "prompt_tuning":
        problems.append(problem(
            key, config.model.init_from, f"is a prompt-tuning adapter; method={config.method.name}"
            f" (method.peft={peft}) cannot build on it: virtual tokens cannot be merged into "
            "weights", "a full model, a LoRA adapter, or method=prompt_tuning to continue it",
            "start from the run the prompt tuning started from"))
    if kind == "lora" and peft == "prompt_tuning":
        problems.append(problem(
            key, config.model.init_from, "is a LoRA adapter; prompt tuning on top of it would save "
            "an adapter for a merged model that exists nowhere on disk",
            "a full model directory", "python -m lmalign stage=merge run_name=<that run>, then "
            "model.init_from=<that run>/merged"))
    if kind not in ("none", "lora", "prompt_tuning"):
        problems.append(problem(key, config.model.init_from, f"holds a {kind} adapter",
                                "a full model, a LoRA or a prompt-tuning adapter",
                                "start from a full model"))
    if config.model.quantization != "none" and kind == "lora" and peft != "lora":
        problems.append(problem(
            "model.quantization", config.model.quantization, "a LoRA adapter cannot be merged "
            "into quantized weights", "none when merging the starting adapter",
            "model.quantization=none, or method.peft=lora to continue the adapter"))
    return problems


def load_start_tokenizer(start: Start, model: ModelConfig):
    return load_tokenizer(start.tokenizer, model,
                          start.revision if start.tokenizer == start.path else None)


def load_tokenizer(path: str, model: ModelConfig, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision,
                                              trust_remote_code=model.trust_remote_code)
    if model.chat_template_path:
        tokenizer.chat_template = Path(model.chat_template_path).expanduser().read_text()
    if model.eos_token:
        tokenizer.eos_token = model.eos_token
    if tokenizer.pad_token is None:
        # TRL pads by position, so pad == eos no longer masks EOS out of the loss; say so anyway.
        log.info("tokenizer has no pad token; using eos %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(model: ModelConfig, hardware: HardwareConfig, trains_weights: bool = False):
    """model.dtype, or with `auto` the training precision's. fp16 mixed precision keeps fp32
    master copies of the weights it trains (its gradient scaler refuses fp16 parameters)."""
    import torch

    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    if hardware.precision == "fp16" and trains_weights:
        return torch.float32
    return getattr(torch, PRECISION_DTYPE[hardware.precision])


def flash_attention_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def attention(model: ModelConfig, hardware: HardwareConfig, announce: bool = True) -> str:
    """The attention implementation: the model's if set (explicit; validated), else the hardware
    profile's, falling back from flash-attention to sdpa with a notice when it is not installed."""
    if model.attn_implementation:
        return model.attn_implementation
    if hardware.attn_implementation == "flash_attention_2" and not flash_attention_installed():
        if announce:
            log.warning("hardware=%s prefers flash_attention_2 but flash-attn is not installed: "
                        "using sdpa (pip install flash-attn to use it)", hardware.name)
        return "sdpa"
    return hardware.attn_implementation


def quantization_config(model: ModelConfig, hardware: HardwareConfig):
    """QLoRA's recipe: NF4 with double quantisation, computing in the training precision."""
    if model.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(model, hardware))


def load_model(path: str, model: ModelConfig, hardware: HardwareConfig,
               revision: str | None = None, trains_weights: bool = False,
               head: Head = "causal_lm"):
    """A full model. head=reward: a sequence-classification model with one output; a causal
    LM's weights get a new score head (seeded by the caller), a reward model's keep theirs."""
    quantization = quantization_config(model, hardware)
    extra = {"device_map": {"": _device(hardware)}} if quantization else {}
    loaded = auto_class(head).from_pretrained(
        path, revision=revision, dtype=torch_dtype(model, hardware, trains_weights),
        attn_implementation=attention(model, hardware), quantization_config=quantization,
        trust_remote_code=model.trust_remote_code, **extra, **head_arguments(head))
    return loaded


def auto_class(head: Head):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM


def head_arguments(head: Head) -> dict[str, Any]:
    return {"num_labels": 1} if head == "reward" else {}


def _device(hardware: HardwareConfig) -> str:
    return "cuda" if hardware.accelerator == "cuda" else "cpu"


def load_start(start: Start, model: ModelConfig, hardware: HardwareConfig,
               continue_adapter: bool, trains_weights: bool, head: Head = "causal_lm"):
    """The starting weights: the adapter kept trainable when this run continues it, else merged.
    `trains_weights`: the base weights themselves train (no PEFT)."""
    base = load_model(start.path, model, hardware, start.revision, trains_weights, head)
    if start.adapter is None:
        return base
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(base, start.adapter, is_trainable=continue_adapter)
    if continue_adapter:
        log.info("continuing the %s adapter of %s", start.adapter_kind, start.adapter)
        return loaded
    log.info("merging the LoRA adapter of %s into its base model", start.adapter)
    return loaded.merge_and_unload()


FSDP_SHARDS = "pytorch_model_fsdp_0"  # accelerate's sharded model state inside a checkpoint
CONSOLIDATED = "consolidated"


def loadable(path: Path) -> Path:
    """A checkpoint as a directory from_pretrained reads. An FSDP checkpoint's sharded state
    (SHARDED_STATE_DICT, one file per rank) is merged once by accelerate into
    <checkpoint>/consolidated/, with the architecture the run saved beside its checkpoints."""
    shards = path / FSDP_SHARDS
    if not shards.is_dir() or (path / "config.json").exists() or (path / ADAPTER_CONFIG).exists():
        return path
    target = path / CONSOLIDATED
    if (target / "config.json").exists():
        return target
    architecture = path.parent / "config.json"
    if not architecture.exists():
        raise UserError(problem("eval.checkpoints", path.name, "an FSDP checkpoint without the "
                                f"model config its run saves in {path.parent}",
                                "checkpoints of runs that saved it, or final", "eval.checkpoints="
                                "[final]"))
    from accelerate.utils import merge_fsdp_weights

    log.info("consolidating the FSDP shards of %s (once)", path)
    with rundir.staged_directory(target) as staging:
        merge_fsdp_weights(str(shards), str(staging), safe_serialization=True)
        shutil.copy(architecture, staging / "config.json")
    return target


def load_trained(path: str, model: ModelConfig, hardware: HardwareConfig,
                 revision: str | None = None, head: Head = "causal_lm"):
    """A checkpoint or final/ as saved: full weights, or an adapter on its recorded base."""
    if revision is None and Path(path).is_dir():
        path = str(loadable(Path(path)))
    info = adapter_config(path)
    if info is None:
        return load_model(path, model, hardware, revision, head=head)
    from peft import PeftModel

    base = load_model(info["base_model_name_or_path"], model, hardware, info.get("revision"),
                      head=head)
    return PeftModel.from_pretrained(base, path).eval()


def merge_adapter(adapter: str, model: ModelConfig, hardware: HardwareConfig,
                  target: Path) -> None:
    """A LoRA adapter merged into its base: a full model (weights and tokenizer) in `target`,
    written whole or not at all."""
    if model.quantization != "none":
        model = dataclasses.replace(model, quantization="none")  # merge into full weights
        log.info("merging into the unquantized base weights")
    loaded = load_trained(adapter, model, hardware)
    tokenizer = load_tokenizer(adapter, model)
    with rundir.staged_directory(target) as staging:
        loaded.merge_and_unload().save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def quantization_problem(model: ModelConfig, hardware: HardwareConfig) -> str | None:
    """Can bitsandbytes quantize and run a layer here? Probed by doing it, not by device name."""
    if model.quantization == "none":
        return None
    import importlib.util

    key, fix = "model.quantization", "model.quantization=none (plain LoRA)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return problem(key, model.quantization, "bitsandbytes is not installed",
                       "none, or 4bit/8bit with bitsandbytes installed",
                       f"pip install 'lmalign[qlora]', or {fix}")
    try:
        _probe_quantized_forward(model, hardware)
    except Exception as exc:  # whatever bitsandbytes raises where it cannot run
        reason = " ".join(str(exc).split())[:200]
        return problem(key, model.quantization,
                       f"bitsandbytes cannot run {model.quantization} layers on "
                       f"{_device(hardware)} here ({type(exc).__name__}: {reason})",
                       "none, or 4bit/8bit where bitsandbytes runs", fix)
    return None


def _probe_quantized_forward(model: ModelConfig, hardware: HardwareConfig) -> None:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    probe = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    with tempfile.TemporaryDirectory() as directory:
        AutoModelForCausalLM.from_config(probe).save_pretrained(directory)
        loaded = load_model(directory, model, hardware)
        with torch.no_grad():
            loaded(torch.tensor([[1, 2, 3]], device=_device(hardware)))


def build_on_meta(model: ModelConfig, head: Head = "causal_lm"):
    """The model with no weights, from its recorded architecture numbers: works offline.

    PyTorch's meta device, not accelerate's init_empty_weights: under transformers 5 the latter
    leaves tied embeddings untied (SmolLM2-135M then counts 162.8M parameters instead of 134.5M).
    """
    import torch
    from transformers import AutoConfig

    arch = dict(model.architecture)
    if model.source == "embedded":  # its vocabulary is its tokenizer's, built here without weights
        arch["vocab_size"] = max(len(embedded.build_tokenizer()), arch.get("vocab_size", 0))
    config = AutoConfig.for_model(arch.pop("model_type"), **arch, **head_arguments(head))
    with torch.device("meta"):
        return auto_class(head).from_config(config)


def is_reward_model(path: str | Path) -> bool:
    """A saved sequence-classification model with one output (method=reward's, or a reward
    model on disk); an adapter by its PEFT task type."""
    return reward_model_kind(path) is True


def reward_model_kind(path: str | Path, revision: str | None = None) -> bool | None:
    """Whether a model directory (or hub model, from its config alone) is a reward model; None
    when its config cannot be read here (a hub model offline and not cached)."""
    info = adapter_config(path) if Path(path).is_dir() else None
    if info is not None:
        return info.get("task_type") == "SEQ_CLS"
    try:
        from transformers import AutoConfig

        found = AutoConfig.from_pretrained(str(loadable(Path(path)) if Path(path).is_dir()
                                               else path), revision=revision)
    except Exception:  # whatever a hub lookup raises offline: unknown, not an error here
        return None
    return found.num_labels == 1 and any(
        a.endswith("ForSequenceClassification") for a in found.architectures or [])


def count_parameters(module) -> tuple[int, int]:
    """(trainable, total); tied weights count once."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total
