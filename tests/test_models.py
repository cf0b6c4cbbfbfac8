"""Hub models build offline from their recorded architecture numbers; the tiny one from a seed."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from conftest import typed_config
from lmalign import models
from test_config import options

HUB_MODELS = [m for m in options("model") if m != "tiny"]


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_model_parameter_count_matches_the_published_size(name):
    from lmalign.models import build_on_meta, count_parameters

    model_config = typed_config(f"model={name}").model
    model = build_on_meta(model_config)
    assert next(model.parameters()).device.type == "meta"  # no weights were allocated
    _, total = count_parameters(model)
    published = model_config.published_params
    assert abs(total - published) / published < 0.02, f"{name}: {total:,} vs {published:,}"


def _weights_digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_embedded_model_is_deterministic_and_cached(tmp_path):
    from lmalign import embedded

    arch = typed_config().model.architecture
    first = embedded.materialize("tiny", arch, 0, tmp_path / "a")
    again = embedded.materialize("tiny", arch, 0, tmp_path / "b")
    other_seed = embedded.materialize("tiny", arch, 1, tmp_path / "a")
    assert _weights_digest(first) == _weights_digest(again)
    assert _weights_digest(first) != _weights_digest(other_seed)
    assert embedded.materialize("tiny", arch, 0, tmp_path / "a") == first  # built once


def test_embedded_tokenizer_round_trips_and_keeps_pad_apart_from_eos():
    from lmalign import embedded

    tokenizer = embedded.build_tokenizer()
    text = "Grüße, 世界! 3 < 5"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True,
                                            return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(trained) == "hello" + embedded.EOS  # the reply and its EOS


def test_init_from_a_run_that_has_not_trained_names_where_it_looked(tmp_path):
    from lmalign.errors import UserError

    config = typed_config("model.init_from=my_sft", f"runs_root={tmp_path}")
    with pytest.raises(UserError, match=r"model.init_from='my_sft': no trained model there.*"
                       r"fix: train that run first"):
        models.starting_point(config)


def test_a_prompt_tuning_adapter_cannot_start_dpo():
    start = models.Start("base", None, tokenizer="base", adapter="runs/pt/final",
                         adapter_kind="prompt_tuning")
    config = typed_config("method=dpo", "dataset=tiny_prefs", "model.init_from=pt")
    (line,) = models.start_problems(start, config)
    assert "is a prompt-tuning adapter; method=dpo (method.peft=none) cannot build on it" in line


def test_prompt_tuning_on_a_lora_adapter_says_to_merge_first():
    start = models.Start("base", None, tokenizer="base", adapter="runs/lora/final",
                         adapter_kind="lora")
    (line,) = models.start_problems(start, typed_config("method=prompt_tuning",
                                                        "model.init_from=lora"))
    assert "stage=merge run_name=<that run>" in line


def test_quantization_is_probed_by_running_it():
    """Where bitsandbytes cannot run (here: CUDA requested on a machine without it), one line."""
    import torch

    config = typed_config("method=lora", "model.quantization=4bit")
    assert models.quantization_problem(config.model, config.hardware) is None  # runs on this CPU
    if not torch.cuda.is_available():
        cuda = dataclasses.replace(config.hardware, accelerator="cuda")
        line = models.quantization_problem(config.model, cuda)
        assert line.startswith("model.quantization='4bit': bitsandbytes cannot run 4bit layers "
                               "on cuda here")


def test_an_fsdp_sharded_checkpoint_is_consolidated_once_into_a_loadable_model(tmp_path,
                                                                                lmalign_cache):
    """The checkpoint is written the way accelerate's save_fsdp_model writes SHARDED_STATE_DICT
    (torch.distributed.checkpoint, {"model": state}); FSDP itself needs GPUs."""
    import torch
    import torch.distributed.checkpoint as dcp

    config = typed_config(f"cache.build_dir={lmalign_cache}")
    trained = models.load_model(models.resolve(config.model, lmalign_cache), config.model,
                                config.hardware)
    with torch.no_grad():
        trained.model.norm.weight.add_(1.0)  # differs from the seed's weights
    checkpoint = tmp_path / "checkpoints" / "checkpoint-10"
    dcp.save({"model": trained.state_dict()}, checkpoint_id=checkpoint / models.FSDP_SHARDS)
    trained.config.save_pretrained(checkpoint.parent)  # what train_and_save writes under FSDP

    loaded = models.load_trained(str(checkpoint), config.model, config.hardware)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    consolidated = checkpoint / models.CONSOLIDATED / "model.safetensors"
    first = consolidated.stat().st_mtime_ns
    models.load_trained(str(checkpoint), config.model, config.hardware)
    assert consolidated.stat().st_mtime_ns == first  # merged once, then reused
