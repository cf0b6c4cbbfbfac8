"""Distributed launch: the launch/ files, the driver/worker split, and real 2-process DDP on CPU."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shlex

import pytest

from conftest import command_line, lmalign, marked_processes, typed_config
from lmalign import launch, machine, training
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

    config, parsed = _accelerate_config("8gpu_zero3")
    assert parsed.distributed_type == "DEEPSPEED"
    deepspeed_file = launch.launch_file(config.hardware).with_suffix(".json")
    assert json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"] == 3

    class EightProcesses(TrainingArguments):
        world_size = property(lambda self: 8)

    arguments = training.trainer_arguments(config, launch.BUNDLED / "unused", [], has_eval=False)
    arguments.update(bf16=False, use_cpu=True)  # built on this CPU; the batch sizes are the point
    deepspeed = HfTrainerDeepSpeedConfig(str(deepspeed_file))
    deepspeed.trainer_config_process(EightProcesses(**arguments))
    assert deepspeed.config["train_micro_batch_size_per_gpu"] == 4
    assert deepspeed.config["gradient_accumulation_steps"] == 1
    assert deepspeed.config["train_batch_size"] == 32 == config.method.global_batch_size


def test_launch_command_names_the_profile_file_and_adds_size_precision_rendezvous(tmp_path):
    config = typed_config("hardware=8gpu_fsdp")
    args = launch.command(config, tmp_path, tmp_path / "handoff" / "train-1",
                          launch.Rendezvous(1, 0, "127.0.0.1", 29500))
    text = shlex.join(args)
    assert "accelerate.commands.launch --config_file" in text and "launch/fsdp2.yaml" in text
    assert "--num_processes 8" in text and "--mixed_precision bf16" in text
    assert "--main_process_port 29500" in text and args[-4:] == [
        "-m", "lmalign.worker", str(tmp_path.resolve()), str(tmp_path / "handoff" / "train-1")]


def test_two_nodes_meet_at_the_configured_or_slurm_rank_and_address(tmp_path):
    config = typed_config("hardware=8gpu_fsdp", "hardware.num_nodes=2", "hardware.world_size=16",
                          "hardware.per_device_batch_size=2", "hardware.node_rank=1",
                          "hardware.main_address=10.0.0.1")
    text = shlex.join(launch.command(config, tmp_path, tmp_path / "handoff"))
    assert ("--num_processes 16 --num_machines 2 --machine_rank 1" in text
            and "--main_process_ip 10.0.0.1 --main_process_port 29500" in text)
    assert not launch.is_main_node(config.hardware)

    slurm = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "0"}
    hardware = dataclasses.replace(config.hardware, node_rank=None)
    assert launch.rendezvous(hardware, slurm) == launch.Rendezvous(2, 0, "10.0.0.1", 29500)
    assert launch.is_main_node(hardware, slurm)


def test_multi_node_problems_name_what_is_missing():
    hardware = typed_config("hardware=8gpu_fsdp", "hardware.num_nodes=2",
                            "hardware.world_size=16", "hardware.per_device_batch_size=2").hardware
    problems = launch.rendezvous_problems(hardware, {})
    assert [p.split(":")[0] for p in problems] == ["hardware.node_rank=None",
                                                   "hardware.main_address=None"]
    with pytest.raises(UserError, match=r"hardware.num_nodes=2: this SLURM job has 1 node\(s\).*"
                       r"fix: hardware.num_nodes=1, or submit with --nodes=2"):
        launch.rendezvous(hardware, {"SLURM_JOB_NODELIST": "gpu07", "SLURM_NNODES": "1",
                                     "SLURM_NODEID": "0"})
    with pytest.raises(UserError, match=r"hardware.num_nodes=3: hardware.world_size=16 processes "
                       r"do not divide evenly over the nodes"):
        typed_config("hardware=8gpu_fsdp", "hardware.num_nodes=3", "hardware.world_size=16")


def test_bf16_falls_back_to_fp16_only_when_the_profile_chose_it():
    config = typed_config("hardware=a100")
    fitted, problems = machine.fit_to_gpus(config, set(), visible=1, bf16_supported=False,
                                            device_name="Tesla V100")
    assert problems == [] and fitted.hardware.precision == "fp16"
    _, problems = machine.fit_to_gpus(config, {"hardware.precision"}, visible=1,
                                       bf16_supported=False, device_name="Tesla V100")
    assert problems == ["hardware.precision='bf16': this GPU (Tesla V100) has no bf16 support; "
                        "allowed: fp16 or fp32 here; fix: hardware.precision=fp16, or hardware=t4"]


def test_more_processes_than_gpus_shrinks_a_profile_default_but_not_an_explicit_request():
    config = typed_config("hardware=8gpu_fsdp")
    fitted, problems = machine.fit_to_gpus(config, set(), visible=4, bf16_supported=True,
                                            device_name="A100")
    assert problems == [] and fitted.hardware.world_size == 4
    assert fitted.gradient_accumulation == 2  # the global batch stays 32
    _, problems = machine.fit_to_gpus(config, {"hardware.world_size"}, visible=4,
                                       bf16_supported=True, device_name="A100")
    assert problems == ["hardware.world_size=8: 8 processes per node but 4 visible GPU(s); "
                        "allowed: at most 4 per node here; fix: hardware.world_size=4 (the global "
                        "batch stays the same)"]


def test_liger_kernels_are_refused_on_a_cpu_profile_and_where_not_installed():
    _, problems = machine.check_environment_for(typed_config("hardware.liger_kernel=true"))
    assert problems == ["hardware.liger_kernel=True: Liger's kernels are Triton GPU kernels and "
                        "hardware=cpu trains on the CPU; allowed: true on a CUDA profile; fix: "
                        "hardware.liger_kernel=false"]
    _, problems = machine.check_environment_for(typed_config("hardware=a100",
                                                             "hardware.liger_kernel=true"))
    assert "hardware.liger_kernel=True: liger-kernel is not installed" in problems[0]
    assert typed_config("hardware=a100").hardware.liger_kernel is False  # not measured yet


def test_torch_compile_reaches_the_trainer_and_no_profile_turns_it_on_unmeasured():
    """On this CPU it changed no loss (5e-7 over 60 steps) but cost 68 s of compiling for a
    steady state 8% faster: off; benchmarks/gpu_check.py's sft_compile measures it on a GPU."""
    config = typed_config("hardware.torch_compile=true")
    arguments = training.trainer_arguments(config, launch.BUNDLED / "unused", [], has_eval=False)
    assert arguments["torch_compile"] is True
    for profile in ("cpu", "cpu_ddp", "t4", "a100", "8gpu_fsdp", "8gpu_zero3"):
        assert typed_config(f"hardware={profile}").hardware.torch_compile is False


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


def test_gpu_profiles_plan_with_memory_within_15_percent_of_accelerate(tmp_path):
    from lmalign import plan

    gaps = {}
    for hardware in ("t4", "a100", "8gpu_fsdp", "8gpu_zero3"):
        text = plan.describe(typed_config("model=smollm2_1.7b", f"hardware={hardware}",
                                          "dry_run=true"), tmp_path)
        assert f"hardware       {hardware}: cuda" in text
        gaps[hardware] = int(re.search(r"accelerate's estimator of the same model's weights, "
                                       r"gradients and optimizer: [\d.]+ GiB, lmalign's is "
                                       r"([+-]\d+)%", text)[1]) / 100
        fits = "does not fit" not in text
        assert fits == (hardware != "t4"), text  # 1.7B full fine-tuning needs > 16 GB
        assert re.search(r"\+ activations [\d.]+ GiB \(\d+ x 1024 tokens per micro-batch\)",
                         text), text
    assert all(abs(gap) <= 0.15 for gap in gaps.values()), gaps
    # Sharded over 8, a device holds an eighth of the single-GPU mixed-precision state.
    assert gaps["8gpu_fsdp"] == pytest.approx(gaps["t4"], abs=0.02)  # whole percents now


@pytest.mark.slow
def test_cpu_ddp_trains_sft_and_dpo_in_two_processes_and_evaluates(ddp_run, tmp_path,
                                                                    lmalign_cache):
    short = ("dataset.max_samples=1024", "eval.harness.limit=40")
    sft, run_dir = ddp_run
    log = sft.stdout + sft.stderr
    assert "launching 2 worker processes (ddp)" in log
    assert "[rank 1]" not in log  # only the main worker logs at INFO
    command = (run_dir / launch.LAUNCH_COMMAND).read_text()
    assert "ACCELERATE_USE_CPU=1" in command and "--num_processes 2" in command
    assert (run_dir / "final" / "model.safetensors").exists()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["train"]["global_step"] == 60 and record["status"] == "done"
    # Evaluation ran in 2 processes too (20 of tiny_gen's 40 generations each), and scores the
    # base model exactly as one process does.
    assert "evaluating in 2 processes" in log and "20/20" in log
    lmalign("run_name=one_process", "stage=eval", "eval.checkpoints=[base]", *short,
            cwd=tmp_path, cache=lmalign_cache, check=True)
    split, single = _rows(run_dir, "base"), _rows(tmp_path / "runs" / "one_process", "base")
    assert split == single and {task for task, _ in split} == {"tiny_mc", "tiny_gen"}

    # DPO's trainer in 2 processes too (evaluating in several processes is checked above).
    lmalign("run_name=ddp_dpo", "hardware=cpu_ddp", "method=dpo", "dataset=tiny_prefs",
            f"model.init_from={run_dir}", "method.max_steps=10", "eval=none",
            "dataset.max_samples=1024",
            cwd=tmp_path, cache=lmalign_cache, check=True)
    dpo_dir = tmp_path / "runs" / "ddp_dpo"
    assert (dpo_dir / "final" / "model.safetensors").exists()
    record = json.loads((dpo_dir / "run.json").read_text())
    assert record["train"]["global_step"] == 10 and record["status"] == "done"


@pytest.mark.slow
def test_the_watcher_evaluates_in_the_processes_train_eval_uses_and_reuses_its_cells(
        ddp_run, tmp_path, lmalign_cache):
    import shutil

    from lmalign.evaluation import cells

    run_dir = tmp_path / "runs" / "ddp"
    shutil.copytree(ddp_run[1], run_dir, ignore=shutil.ignore_patterns(
        "checkpoint-20", "checkpoint-40"))
    few_shot = ("hardware=cpu_ddp", "eval.harness.tasks=[tiny_mc]", "eval.harness.limit=40",
                "eval.harness.num_fewshot=2", "run_name=ddp")
    lmalign("stage=eval", "eval.checkpoints=[final]", *few_shot, cwd=tmp_path,
            cache=lmalign_cache, check=True)
    (final_cell,) = [c.parent for c in (run_dir / "eval" / "final").glob(
        f"*fs2*/{cells.CELL_RECORD}")]
    final_record = (final_cell / cells.CELL_RECORD).read_text()
    assert '"processes": 2' in final_record

    watched = lmalign("stage=watch", "watch.poll_seconds=0.5", *few_shot, cwd=tmp_path,
                      cache=lmalign_cache, check=True)
    log = watched.stdout + watched.stderr
    assert "eval final" not in log  # its cell is the one stage=eval wrote, found and kept
    assert [c.parent for c in (run_dir / "eval" / "final").glob(
        f"*fs2*/{cells.CELL_RECORD}")] == [final_cell]
    assert (final_cell / cells.CELL_RECORD).read_text() == final_record
    assert "evaluating in 2 processes" in log  # checkpoint-60, as train_eval would
    (new_cell,) = (run_dir / "eval" / "checkpoint-60").glob(f"*fs2*/{cells.CELL_RECORD}")
    assert '"processes": 2' in new_cell.read_text()
    assert not (run_dir / "handoff").exists() or all(
        "watch" in p.name or "eval" in p.name for p in (run_dir / "handoff").iterdir())


@pytest.mark.slow
def test_sigterm_while_workers_evaluate_ends_every_worker_and_the_rerun_writes_the_cell(
        ddp_run, tmp_path, lmalign_cache):
    """Evaluation in 2 processes (torch's agent between us and them): SIGTERM to lmalign ends
    the launcher and both workers, exits 143 with one stopped: line, writes no cell, and the
    same command then writes it."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from lmalign.evaluation import cells

    run_dir = tmp_path / "runs" / "ddp"
    shutil.copytree(ddp_run[1], run_dir, ignore=shutil.ignore_patterns(
        "checkpoint-*", "eval"))
    marker = f"lmalign-test-{uuid.uuid4().hex}"
    args = [sys.executable, "-m", "lmalign", "stage=eval", "run_name=ddp", "hardware=cpu_ddp",
            "eval.checkpoints=[final]", "eval.harness.tasks=[tiny_mc]",
            "eval.harness.limit=40", "eval.harness.num_fewshot=3"]
    env = {**os.environ, "LMALIGN_CACHE": str(lmalign_cache), "LMALIGN_TEST_MARK": marker}
    log = tmp_path / "stopped.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while "eval final: tiny_mc, 3-shot" not in log.read_text():  # the workers are evaluating
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    workers = [pid for pid in marked_processes(marker)
               if "lmalign.worker" in command_line(pid) and "accelerate" not in command_line(pid)]
    assert len(workers) == 2  # and the launcher, which started them
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    output = log.read_text()
    assert "Traceback" not in output and "stopped: SIGTERM" in output, output[-3000:]
    assert marked_processes(marker) == []
    assert not list((run_dir / "eval").rglob(cells.CELL_RECORD))

    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (cell,) = (run_dir / "eval" / "final").glob(f"*fs3*/{cells.CELL_RECORD}")
    assert '"processes": 2' in cell.read_text()
    assert marked_processes(marker) == []


def _rows(run_dir, checkpoint):
    with open(run_dir / "metrics.csv") as handle:
        return {(r["task"], r["metric"]): (r["value"], r["cell"].split("/")[-1])
                for r in csv.DictReader(handle) if r["checkpoint"] == checkpoint}


def test_few_shot_cells_record_the_process_count_zero_shot_cells_do_not():
    """Split over processes, lm-eval draws few-shot examples per process: different results."""
    from lmalign.evaluation import harness

    evaluation = typed_config().eval
    assert harness.settings(evaluation, 0, processes=2) == harness.settings(evaluation, 0)
    assert harness.settings(evaluation, 2, processes=2) == {
        **harness.settings(evaluation, 2), "processes": 2}
