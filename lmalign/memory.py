"""Per-device memory for weights, gradients and optimizer state: the dry-run plan's estimate.

Counted parameter by parameter on the model built on the meta device (with the method's PEFT
wrapper, so frozen and trained parameters are known), in the dtypes the run really keeps:

- one process or DDP: each tensor in the dtype it is loaded in. bf16 profiles load bf16 weights
  and AdamW keeps its two moments in the parameter's dtype; the fp16 profile loads the weights it
  trains in fp32 (its gradient scaler refuses fp16 parameters); PEFT keeps adapters in fp32, but
  TRL casts QLoRA adapters to bf16. Quantized weights take 4 or 8 bits.
  DDP's gradient buckets hold one more copy of the gradients.
- FSDP2 with bf16/fp16: accelerate upcasts trained parameters to fp32 before sharding.
- ZeRO-3 with bf16/fp16: DeepSpeed casts the model to 16 bits and its optimizer keeps fp32 master
  weights and fp32 moments, 12 bytes per trained parameter (the ZeRO paper's accounting).
- FSDP and ZeRO-3 divide all of it by the number of processes.
- DPO and KTO training all weights hold a frozen reference model beside the policy; so does GRPO
  when
  its KL term is on (beta > 0), as RLOO's.
- GRPO and RLOO generate: the KV cache of one generation batch per device (per-device batch x
  accumulation sequences of the prompt's max_length plus max_completion_length tokens).

- Activations: what one micro-batch's forward saves for the backward pass, traced on the meta
  model itself (autograd's saved-tensor hooks count every saved tensor once, parameters not
  counted) at per-device batch x max_length tokens in the run's compute dtype, with attention
  saving what flash attention and sdpa's efficient kernels save (q, k, v, output, log-sum-exp),
  not a seq x seq matrix. DPO and KTO run chosen and rejected (or KL) sequences together: twice
  the rows; GRPO and RLOO score prompt + completion. With gradient checkpointing the trace
  keeps each layer's input, plus one layer's activations recomputed in the backward.
  Checked against PyTorch's own memory timeline on the CPU (allocator-level peak minus weights,
  tests/test_memory.py): within 4% for a 106M Llama at 4 x 256 and 2 x 1024 tokens and an
  8-layer 256-wide one. A model the
  meta device cannot run (data-dependent routing) gets no activation figure, and the plan says so.
accelerate's own estimator (`accelerate estimate-memory`) is run on the same meta model as a
cross-check; it models training all weights, so it is reported only for full fine-tuning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lmalign import models
from lmalign.schema import PRECISION_DTYPE, Config

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_QUANTIZED_BYTES = {"4bit": 0.5, "8bit": 1.0}  # quantization constants not counted
_ADAPTER_BYTES = 4  # PEFT autocasts adapter weights to fp32...
_QLORA_ADAPTER_BYTES = 2  # ...but TRL casts them to bf16 on quantized models (the QLoRA paper's)


@dataclass(frozen=True)
class Estimate:
    """Bytes per device."""
    weights: float
    gradients: float
    optimizer: float
    reference: float  # DPO's (and GRPO's, with beta > 0) frozen reference model
    generation: float  # GRPO's (RLOO's) KV cache while it samples completions
    activations: float | None  # saved for backward by one micro-batch; None: not traceable
    shards: int  # processes the state is divided over (1 = replicated)
    accelerate: float | None  # accelerate's estimator on the same model, where comparable

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.reference + self.generation
                + (self.activations or 0.0))


def estimate(config: Config, meta_model) -> Estimate:
    """meta_model: the run's model on the meta device, PEFT wrapper applied."""
    model, method, hardware = config.model, config.method, config.hardware
    trains_all = method.peft == "none"
    mixed = hardware.precision != "fp32"
    trained_dtype = models.torch_dtype(model, hardware, trains_weights=trains_all)
    frozen_dtype = models.torch_dtype(model, hardware, trains_weights=False)
    if trains_all:
        trained_bytes = _DTYPE_BYTES[_name(trained_dtype)]
    else:
        trained_bytes = _ADAPTER_BYTES if model.quantization == "none" else _QLORA_ADAPTER_BYTES
    frozen_bytes = _DTYPE_BYTES[_name(frozen_dtype)]
    zero3_mixed = hardware.distributed == "deepspeed" and mixed
    if hardware.distributed == "fsdp" and mixed:
        trained_bytes = 4
    if zero3_mixed:
        trained_bytes = frozen_bytes = 2

    quantized = _quantized_parameters(meta_model) if model.quantization != "none" else set()
    weights = gradients = optimizer = 0.0
    trained = 0
    for name, parameter in meta_model.named_parameters():
        count = parameter.numel()
        if parameter.requires_grad:
            trained += count
            weights += count * trained_bytes
            gradients += count * trained_bytes
            optimizer += count * (12 if zero3_mixed else 2 * trained_bytes)
        elif name in quantized:
            weights += count * _QUANTIZED_BYTES[model.quantization]
        else:
            weights += count * frozen_bytes
    if hardware.distributed == "ddp":
        gradients *= 2  # DDP's buckets copy the gradients (gradient_as_bucket_view is off)
    reference = 0.0
    kl_term = method.name in ("dpo", "kto") or (method.sampling is not None and method.sampling.beta > 0)
    if kl_term and trains_all:
        reference = sum(p.numel() for p in meta_model.parameters()) * frozen_bytes
    generation = _kv_cache(config, frozen_bytes) if method.sampling is not None else 0.0
    shards = hardware.world_size if hardware.distributed in ("fsdp", "deepspeed") else 1
    comparable = trains_all and model.quantization == "none" and trained == _count(meta_model)
    return Estimate(weights=weights / shards, gradients=gradients / shards,
                    optimizer=optimizer / shards, reference=reference / shards,
                    generation=generation, activations=activations(config, meta_model),
                    shards=shards,
                    accelerate=_accelerate(config, meta_model) if comparable else None)


def _kv_cache(config: Config, value_bytes: int) -> float:
    """Keys and values of every layer for one generation batch on one device."""
    architecture, method = config.model.architecture, config.method
    layers = architecture.get("num_hidden_layers", 0)
    heads = architecture.get("num_attention_heads", 1)
    kv_heads = architecture.get("num_key_value_heads") or heads
    head_dim = architecture.get("head_dim") or architecture.get("hidden_size", 0) // heads
    sequences = config.hardware.per_device_batch_size * config.gradient_accumulation
    tokens = method.max_length + method.sampling.max_completion_length
    return 2 * layers * kv_heads * head_dim * tokens * sequences * value_bytes


def micro_batch(config: Config) -> tuple[int, int]:
    """(rows, tokens per row) of one forward pass in training."""
    method, rows = config.method, config.hardware.per_device_batch_size
    length = method.max_length
    if method.name in ("dpo", "kto"):
        rows *= 2  # chosen and rejected (KTO: completions and the KL batch) in one pass
    if method.sampling is not None:
        length += method.sampling.max_completion_length
    return rows, length


def activations(config: Config, meta_model) -> float | None:
    """Bytes one micro-batch's forward saves for backward (module docstring), or None where the
    model cannot run on the meta device."""
    import copy

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.hardware.precision,
                                                                  torch.float32)
    from transformers import AttentionInterface

    # A copy of the meta model (no memory: meta tensors), changed freely: the compute dtype, a
    # pad id for a reward head to find rows' ends by, the flash-like attention below.
    model = copy.deepcopy(meta_model).to(dtype)
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.get_text_config().pad_token_id is None:
        base.config.get_text_config().pad_token_id = 0
    AttentionInterface.register(_PLAN_ATTENTION, _flash_like_attention)
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "_attn_implementation"):
            module.config._attn_implementation = _PLAN_ATTENTION
    # A language model's loss: its fp32 log-softmax over the vocabulary is saved too.
    causal = "CausalLM" in type(base).__name__
    rows, length = micro_batch(config)
    try:
        full = _saved_bytes(model, rows, length, causal)
        if not config.hardware.gradient_checkpointing:
            return full
        layers = config.model.architecture.get("num_hidden_layers") or 1
        base.activation_checkpointing_enable({"use_reentrant": True})
        return _saved_bytes(model, rows, length, causal) + full / layers
    except Exception:  # noqa: BLE001 - an estimate, never a reason for a run to fail
        return None


def _saved_bytes(model, rows: int, length: int, causal: bool) -> float:
    import torch

    parameters = {id(p) for p in model.parameters()}
    saved: dict[int, float] = {}
    alive = []  # keeps each counted tensor, so that no id is reused while counting

    def pack(tensor):
        root = tensor
        while root._base is not None:
            root = root._base
        if id(root) not in parameters:
            alive.append(root)
            saved[id(root)] = root.numel() * root.element_size()
        return tensor

    ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, use_cache=False, **({"labels": ids} if causal else {}))
    return float(sum(saved.values()))


_PLAN_ATTENTION = "lmalign_plan_flash_like"


def _flash_like_attention(module, query, key, value, attention_mask, **_):
    return _flash_like().apply(query, key, value), None


@functools.cache  # one class: torch is imported only when a plan is made
def _flash_like():
    import torch

    class FlashLike(torch.autograd.Function):
        """Saves what flash attention saves for backward; on the meta device nothing runs."""

        @staticmethod
        def forward(ctx, query, key, value):
            batch, heads, length, dim = query.shape
            output = query.new_empty(batch, length, heads, dim)
            log_sum_exp = query.new_empty(batch, heads, length, dtype=torch.float32)
            ctx.save_for_backward(query, key, value, output, log_sum_exp)
            return output

        @staticmethod
        def backward(ctx, grad):  # never run: the trace stops after the forward
            raise NotImplementedError

    return FlashLike


def inference_weights(config: Config, parameters: int) -> float:
    """Bytes of one loaded model for evaluation, in the dtype evaluation loads it in."""
    dtype = models.torch_dtype(config.model, config.hardware)
    return parameters * _DTYPE_BYTES[_name(dtype)]


def describe(config: Config, found: Estimate) -> list[tuple[str, str]]:
    """The plan's rows."""
    spread = f", divided over {found.shards} processes" if found.shards > 1 else ""
    reference = f" + reference model {gib(found.reference)}" if found.reference else ""
    generation = (f" + generation KV cache {gib(found.generation)}" if found.generation
                  else "")
    rows_per_pass, length = micro_batch(config)
    activations = (f" + activations {gib(found.activations)} ({rows_per_pass} x {length} tokens "
                   "per micro-batch)" if found.activations is not None else
                   "; activations not estimated (this model does not run on the meta device)")
    rows = [("memory", f"{gib(found.total)} per device: weights "
             f"{gib(found.weights)} + gradients {gib(found.gradients)} + optimizer "
             f"{gib(found.optimizer)}{reference}{generation}{activations}{spread}")]
    if found.accelerate is not None:
        policy_alone = found.total - found.reference - found.generation - (found.activations or 0)
        gap = round(100 * (policy_alone - found.accelerate) / found.accelerate) + 0
        why = []
        if config.hardware.precision != "fp32" and _keeps_fp32_masters(config):
            why.append("it counts gradients at 1.5x under mixed precision")
        if config.hardware.distributed == "ddp":
            why.append("it leaves out DDP's gradient buckets")
        rows.append(("", "accelerate's estimator of the same model's weights, gradients and "
                     "optimizer: "
                     f"{gib(found.accelerate)}, "
                     f"lmalign's is {gap:+d}%{(': ' + '; '.join(why)) if why else ''}"))
    capacity = config.hardware.device_memory_gib
    if capacity and found.total > capacity * GIB:
        advice = ("hardware.gradient_checkpointing=true or a smaller "
                  "hardware.per_device_batch_size (the global batch stays)"
                  if (found.activations or 0) > found.total / 2 else
                  "method=lora, model.quantization=4bit or a sharded profile (hardware=8gpu_fsdp)")
        rows.append(("", f"does not fit: {gib(found.total)} > {capacity:g} GiB on "
                     f"hardware={config.hardware.name}; try {advice}"))
    return rows


def _accelerate(config: Config, meta_model) -> float:
    """accelerate's estimate (model + gradients + Adam, batch 1, no activations) per device."""
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    hardware = config.hardware
    size, _ = calculate_maximum_sizes(meta_model)
    size = size * 4 // _DTYPE_BYTES[_name(next(meta_model.parameters()).dtype)]  # as fp32
    # No fp32 master copy (pure bf16 on one device or DDP): accelerate's no-AMP formula
    # ("float32") applies to the 16-bit size.
    if _keeps_fp32_masters(config):
        mode = PRECISION_DTYPE[hardware.precision]
        usage = estimate_training_usage(size, mode)
    else:
        usage = estimate_training_usage(size // 2, "float32")
    total = usage["model"] + usage["gradients"] + usage["optimizer"]
    shards = hardware.world_size if hardware.distributed in ("fsdp", "deepspeed") else 1
    return total / shards


def _keeps_fp32_masters(config: Config) -> bool:
    import torch

    hardware = config.hardware
    return hardware.precision == "fp32" or hardware.distributed in ("fsdp", "deepspeed") or (
        models.torch_dtype(config.model, hardware, trains_weights=True) == torch.float32)


def _quantized_parameters(meta_model) -> set[str]:
    """Frozen Linear weights that bitsandbytes quantizes: every Linear but the output head."""
    import torch

    return {f"{name}.weight" for name, module in meta_model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
            and not module.weight.requires_grad}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= 0.01 * GIB else f"{size / 1024**2:.1f} MiB"
