"""benchmarks/gpu_check.py on this CPU: the cases that can run here pass through `python -m
lmalign`, the CUDA ones say they need a GPU, the JSON is written case by case, and --cases
reruns one without losing the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "gpu_check.py"


def check(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "LMALIGN_CACHE": str(cache)})


@pytest.mark.slow
def test_the_gpu_check_runs_its_cpu_cases_and_names_what_needs_a_gpu(tmp_path, lmalign_cache):
    out = tmp_path / "check.json"
    cases = "matmul,sft_full,fsdp2,qlora,grpo"
    done = check("--cases", cases, "--steps", "6", "--out", str(out), "--work",
                 str(tmp_path / "work"), cwd=tmp_path, cache=lmalign_cache)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["cases"]
    assert list(rows) == cases.split(",")
    assert {name: rows[name]["status"] for name in rows} == {
        "matmul": "pass", "sft_full": "pass", "fsdp2": "not run", "qlora": "not run",
        "grpo": "pass"}
    assert rows["fsdp2"]["why"] == "needs a CUDA GPU"
    sft = rows["sft_full"]["figures"]
    assert sft["tokens/s"] > 0 and sft["TFLOP/s"] > 0 and sft["MFU measured"].endswith("%")
    assert sft["plan MiB"] > sft["of which activations"] > 0
    assert rows["matmul"]["figures"]["TFLOP/s"] > 0
    assert rows["grpo"]["figures"]["completion tokens/s"] > 0
    table = done.stdout.split("runs in")[1]
    for name in rows:
        assert f"\n{name} " in table

    # One case again: its row is replaced, the others stay as they were.
    again = check("--cases", "matmul", "--out", str(out), "--work", str(tmp_path / "work"),
                  cwd=tmp_path, cache=lmalign_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(out.read_text())["cases"]
    assert rerun["sft_full"] == rows["sft_full"] and list(rerun) == list(rows)

    # A time box (a SLURM allocation, a lent machine): what would start too late is not run,
    # and an earlier row of it stays; a fresh one says why.
    boxed = check("--cases", "matmul,sft_full,lora", "--time-limit", "30", "--out", str(out),
                  "--work", str(tmp_path / "work"), cwd=tmp_path, cache=lmalign_cache)
    assert boxed.returncode == 0, boxed.stderr[-3000:]
    assert "sft_full: --time-limit reached; rerun it with --cases; its earlier row stays" \
        in boxed.stdout
    boxed_rows = json.loads(out.read_text())["cases"]
    assert boxed_rows["sft_full"] == rows["sft_full"]
    assert boxed_rows["lora"] == {"case": "lora", "what": "LoRA SFT", "status": "not run",
                                  "why": "--time-limit reached; rerun it with --cases"}


@pytest.mark.slow
def test_plan_only_checks_the_gpu_cases_commands_here_without_a_gpu(tmp_path, lmalign_cache):
    """The GPU shape (SmolLM2-1.7B's layers) and profiles as dry runs: a command the check would
    send to a GPU and have refused is found here. Nothing is written to the JSON."""
    out = tmp_path / "check.json"
    cases = "matmul,sft_full,fsdp2,zero3"
    planned = check("--plan-only", "--cases", cases, "--out", str(out), "--work",
                    str(tmp_path / "work"), cwd=tmp_path, cache=lmalign_cache)
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    table = planned.stdout.split("\ncase ")[1].splitlines()[1:]
    rows = {line[:16].strip(): (line[17:25].strip(), line[34:]) for line in table}
    assert rows["matmul"] == ("not run", "--plan-only: nothing to plan")
    for name in ("sft_full", "fsdp2", "zero3"):
        assert rows[name][0] == "planned" and rows[name][1].startswith("plan "), rows[name]
    # 1.7B parameters in bf16 with AdamW: weights, gradients and optimizer alone are 25 GiB
    assert float(rows["sft_full"][1].split()[1]) > 25
    assert not out.exists()
    assert "accelerate.commands.launch" in (tmp_path / "work" / "zero3.log").read_text()


def test_ctrl_c_is_one_line_naming_the_cases_left_and_leaves_no_process(tmp_path):
    import signal
    import time

    checking = subprocess.Popen(
        [sys.executable, str(CHECK), "--plan-only", "--cases", "sft_full,lora", "--work",
         str(tmp_path / "work")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = tmp_path / "work" / "sft_full.log"
    deadline = time.monotonic() + 120
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(checking.pid, signal.SIGINT)  # as a terminal sends it: the check and its lmalign
    stdout, stderr = checking.communicate(timeout=120)
    assert checking.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == [
        "stopped: interrupted (Ctrl-C) in sft_full; no case of this command ended; finish with "
        "--cases sft_full,lora"], stderr[-2000:]
    assert not _running_in(tmp_path / "work")  # the case's lmalign runs there


def _running_in(folder: Path) -> list[str]:
    """Processes whose working directory is `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == folder:
                found.append((proc / "cmdline").read_text().replace("\0", " "))
        except OSError:
            continue
    return found


def test_an_unknown_case_or_a_time_limit_too_short_for_any_case_is_one_error_line(tmp_path):
    refused = subprocess.run([sys.executable, str(CHECK), "--cases", "sft_ful"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        refused.stderr.strip()] and "sft_ful unknown; one of matmul, sft_full" in refused.stderr
    refused = subprocess.run([sys.executable, str(CHECK), "--time-limit", "10"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr == (
        "error: --time-limit 10: at least 30 seconds, the least a case is started with\n")
