"""The plan's memory estimate counts what a real run holds: weights, Adam state, DPO's reference."""

from __future__ import annotations

import pytest

from conftest import typed_config
from lmalign import memory, models, plan
from lmalign.methods import dpo, sft

QUICK = ("eval=none", "dataset.max_samples=64", "dataset.max_eval_samples=8", "method.max_steps=1",
         "method.eval_steps=null")


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if id(tensor) not in seen and tensor.dim() > 0:  # Adam's step counters are scalars
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("overrides", [
    ("method=sft",),
    ("method=sft", "hardware.precision=bf16"),
    ("method=lora", "hardware.precision=bf16"),
    ("method=lora", "model.quantization=4bit"),
    ("method=prompt_tuning",),
    ("method=dpo", "dataset=tiny_prefs"),
], ids=["sft-fp32", "sft-bf16", "lora-bf16", "qlora-4bit", "prompt_tuning", "dpo-fp32"])
@pytest.mark.slow  # six trainings: about 20 s
def test_estimate_equals_the_bytes_a_trained_model_holds(overrides, tmp_path, lmalign_cache):
    config = typed_config(*overrides, *QUICK, f"cache.build_dir={lmalign_cache}")
    found = memory.estimate(config, plan.meta_model(config, None))

    module = dpo if config.method.name == "dpo" else sft
    trainer = module.build(config, tmp_path, models.starting_point(config))
    trainer.train()
    weights = _bytes(trainer.model.parameters())
    trained = _bytes(p for p in trainer.model.parameters() if p.requires_grad)
    optimizer = _bytes(t for state in trainer.optimizer.state.values() for t in state.values())

    assert found.weights == pytest.approx(weights, rel=1e-6)
    assert found.gradients == pytest.approx(trained, rel=1e-6)
    assert found.optimizer == pytest.approx(optimizer, rel=1e-6)
    reference = getattr(trainer, "ref_model", None)
    assert found.reference == pytest.approx(_bytes(reference.parameters()) if reference else 0)


def test_ddp_counts_its_gradient_buckets_and_sharding_divides_everything():
    single = memory.estimate(config := typed_config("hardware=cpu"), plan.meta_model(config, None))
    ddp = memory.estimate(config := typed_config("hardware=cpu_ddp"),
                          plan.meta_model(config, None))
    assert ddp.weights == single.weights and ddp.gradients == 2 * single.gradients

    # FSDP2 with bf16 upcasts trained weights to fp32 (accelerate), then shards over 8.
    config = typed_config("model=smollm2_135m", "hardware=8gpu_fsdp")
    fsdp = memory.estimate(config, plan.meta_model(config, None))
    parameters = sum(p.numel() for p in plan.meta_model(config, None).parameters())
    assert fsdp.total - fsdp.activations == pytest.approx(parameters * (4 + 4 + 8) / 8)
    # ZeRO-3 with bf16: 16-bit weights and gradients, fp32 masters and moments in the optimizer.
    config = typed_config("model=smollm2_135m", "hardware=8gpu_zero3")
    zero3 = memory.estimate(config, plan.meta_model(config, None))
    assert (zero3.weights, zero3.optimizer) == pytest.approx((parameters * 2 / 8,
                                                              parameters * 12 / 8))


MID_SHAPE = ("model.architecture.hidden_size=256", "model.architecture.intermediate_size=1024",
             "model.architecture.num_hidden_layers=8", "model.architecture.num_attention_heads=4",
             "model.architecture.num_key_value_heads=2", "hardware.per_device_batch_size=4",
             "method.max_length=256")


@pytest.mark.parametrize("overrides", [(), ("method=lora",)], ids=["full", "lora"])
def test_activations_traced_on_meta_match_the_allocators_peak_in_a_real_step(overrides, tmp_path):
    """The plan's activation term against PyTorch's own memory timeline of one forward and
    backward on the CPU: the allocator's peak minus the weights is the activations plus the
    gradients so far, so the estimate is at most that and within 10% of it."""
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    config = typed_config(*MID_SHAPE, *overrides)
    meta = plan.meta_model(config, None)
    estimate = memory.activations(config, meta)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(meta.config, attn_implementation="sdpa")
    if overrides:
        from peft import get_peft_model

        from lmalign import training
        model = get_peft_model(model, training.peft_config(config.method, tokenizer_path=""))
    model.train()
    rows, length = memory.micro_batch(config)
    ids = torch.randint(0, meta.config.vocab_size, (rows, length))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as profiled:
        model(input_ids=ids, labels=ids).loss.backward()
    profiled.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    beyond_weights = max(sum(at_time) for at_time in sizes) - weights
    assert 0.9 * beyond_weights <= estimate <= beyond_weights, (estimate, beyond_weights)


def test_the_plan_counts_activations_per_micro_batch_and_checkpointing_cuts_them():
    plain = typed_config("model=smollm2_1.7b", "hardware=a100")
    found = memory.activations(plain, plan.meta_model(plain, None))
    checkpointed = typed_config("model=smollm2_1.7b", "hardware=a100",
                                "hardware.gradient_checkpointing=true")
    less = memory.activations(checkpointed, plan.meta_model(checkpointed, None))
    dpo_config = typed_config("model=smollm2_1.7b", "hardware=a100", "method=dpo",
                              "dataset=tiny_prefs")
    pairs = memory.activations(dpo_config, plan.meta_model(dpo_config, None))
    assert memory.micro_batch(plain) == (8, 1024) and memory.micro_batch(dpo_config) == (16, 1024)
    assert less < found / 4  # each layer's input kept, one layer recomputed
    assert pairs == pytest.approx(2 * found, rel=0.01)  # chosen and rejected in one pass
