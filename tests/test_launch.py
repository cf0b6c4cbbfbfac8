"""Distributed launch: the launch/ files, the driver/worker split, and real 2-process DDP on CPU."""

from __future__ import annotations

import json
import shlex

import pytest

from conftest import lmalign, typed_config
from lmalign import launch
from lmalign.errors import UserError


def _accelerate_config(hardware: str):
    from accelerate.commands.config.config_args import load_config_from_file

    config = typed_config(f"hardware={hardware}")
    return config, load_config_from_file(str(launch.launch_file(config.hardware)))


def test_fsdp2_launch_file_parses_to_full_shard_fsdp2():
    config, parsed = _accelerate_config("8gpu_fsdp")
    assert parsed.distributed_type == "FSDP" and config.hardware.world_size == 8
    fsdp = parsed.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_activation_checkpointing"] is True
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert not config.hardware.gradient_checkpointing  # FSDP's own, not the trainer's as well


def test_zero3_launch_file_gives_deepspeed_the_global_batch_for_8_processes():
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from lmalign import training

    config, parsed = _accelerate_config("8gpu_zero3")
    assert parsed.distributed_type == "DEEPSPEED"
    deepspeed_file = launch.launch_file(config.hardware).with_suffix(".json")
    assert json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"] == 3

    class EightProcesses(TrainingArguments):
        world_size = property(lambda self: 8)

    arguments = training.trainer_arguments(config, launch.REPO / "unused", [], has_eval=False)
    arguments.update(bf16=False, use_cpu=True)  # built on this CPU; the batch sizes are the point
    deepspeed = HfTrainerDeepSpeedConfig(str(deepspeed_file))
    deepspeed.trainer_config_process(EightProcesses(**arguments))
    assert deepspeed.config["train_micro_batch_size_per_gpu"] == 4
    assert deepspeed.config["gradient_accumulation_steps"] == 1
    assert deepspeed.config["train_batch_size"] == 32 == config.method.global_batch_size


def test_launch_command_names_the_profile_file_and_adds_size_precision_rendezvous(tmp_path):
    config = typed_config("hardware=8gpu_fsdp")
    args = launch.command(config, tmp_path, port=29500)
    text = shlex.join(args)
    assert "accelerate.commands.launch --config_file" in text and "launch/fsdp2.yaml" in text
    assert "--num_processes 8" in text and "--mixed_precision bf16" in text
    assert "--main_process_port 29500" in text and args[-3:] == ["-m", "lmalign.worker",
                                                                  str(tmp_path.resolve())]


def test_fsdp_on_a_cpu_is_refused_not_silently_run_as_ddp():
    with pytest.raises(UserError, match=r"hardware.distributed='fsdp': FSDP and DeepSpeed need "
                       r"GPUs; on a CPU accelerate would silently train plain DDP.*"
                       r"fix: hardware=cpu_ddp"):
        typed_config("hardware=cpu_ddp", "hardware.distributed=fsdp",
                     "hardware.launch_config=launch/fsdp2.yaml")


def test_bf16_on_a_t4_is_one_line(tmp_path, lmalign_cache):
    result = lmalign("hardware=t4", "model.dtype=bfloat16", "dry_run=true", cwd=tmp_path,
                     cache=lmalign_cache)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.dtype='bfloat16': hardware=t4 has no bf16 support; allowed: float16/float32 "
        "weights and fp16/fp32 precision on this hardware; fix: model.dtype=float16"]


def test_gpu_profiles_plan_offline(tmp_path, lmalign_cache):
    for hardware in ("t4", "a100", "8gpu_fsdp", "8gpu_zero3"):
        result = lmalign("model=smollm2_1.7b", f"hardware={hardware}", "dry_run=true",
                         cwd=tmp_path, cache=lmalign_cache, env={"HF_HUB_OFFLINE": "1"},
                         check=True)
        assert f"hardware       {hardware}: cuda" in result.stdout


@pytest.mark.slow
def test_cpu_ddp_trains_sft_and_dpo_in_two_processes_and_evaluates(tmp_path, lmalign_cache):
    short = ("dataset.max_samples=1024", "eval.limit=40")
    sft = lmalign("run_name=ddp_sft", "hardware=cpu_ddp", "method.max_steps=30", *short,
                  cwd=tmp_path, cache=lmalign_cache, check=True)
    run_dir = tmp_path / "runs" / "ddp_sft"
    log = sft.stdout + sft.stderr
    assert "launching 2 worker processes (ddp)" in log
    assert "[rank 1]" not in log  # only the main worker logs at INFO
    command = (run_dir / launch.LAUNCH_COMMAND).read_text()
    assert "ACCELERATE_USE_CPU=1" in command and "--num_processes 2" in command
    assert (run_dir / "final" / "model.safetensors").exists()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["train"]["global_step"] == 30 and record["status"] == "done"
    assert "tiny_mc" in (run_dir / "metrics.csv").read_text()

    lmalign("run_name=ddp_dpo", "hardware=cpu_ddp", "method=dpo", "dataset=tiny_prefs",
            "model.init_from=ddp_sft", "method.max_steps=10", "eval.tasks=[tiny_prefs]", *short,
            cwd=tmp_path, cache=lmalign_cache, check=True)
    dpo_dir = tmp_path / "runs" / "ddp_dpo"
    assert (dpo_dir / "final" / "model.safetensors").exists()
    assert "tiny_prefs" in (dpo_dir / "metrics.csv").read_text()
