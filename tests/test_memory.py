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
    assert fsdp.total == pytest.approx(parameters * (4 + 4 + 8) / 8)
    # ZeRO-3 with bf16: 16-bit weights and gradients, fp32 masters and moments in the optimizer.
    config = typed_config("model=smollm2_135m", "hardware=8gpu_zero3")
    zero3 = memory.estimate(config, plan.meta_model(config, None))
    assert (zero3.weights, zero3.optimizer) == pytest.approx((parameters * 2 / 8,
                                                              parameters * 12 / 8))
