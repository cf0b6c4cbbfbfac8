"""Every GPU path of lmalign in one run, each case with its figures and pass/fail.

    python benchmarks/gpu_check.py [--cases sft_full,lora] [--out gpu_check.json] [--steps 30]

Runs where it is: on one GPU (H100/H200 class) the training cases use a random-initialised model
of SmolLM2-1.7B's shape (its layers and vocabulary size on the tiny task's tokenizer, built from
a seed: no network), bf16, bfd packing into rows of 2048 tokens; on a CPU they use the embedded
tiny model and skip what needs CUDA, saying so. Every case goes through `python -m lmalign`, the
path a user runs, with its own time cap. The JSON (`--out`) is written after every case, and
`--cases` reruns chosen ones, keeping the others' results. Prints one table. `--plan-only` needs
no GPU: each case's first command runs as a dry run with the GPU shape and profile, so a config
the check would have refused is found before GPU time is spent. `--time-limit S`
ends every case within S seconds (a lent machine, an allocation): cases that would start later
are "not run", and an earlier row of one stays; the `--cases` order is the priority.

On a GPU machine without network (the workplace's H200 image, benchmarks/gpu_image.txt), make
the wheels here and carry them with the checkout (27 MiB for that image):
    make wheelhouse PYTHON_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64 \
        EXTRAS=deepspeed,liger,qlora BNB_CUDA=130 EXCLUDE=benchmarks/gpu_image.txt WHEELHOUSE=.wh-gpu
and there, in the checkout:
    python3 -m pip list --format=freeze > image-freeze.txt   # the image's versions, for next time
    python3 -m pip install -q --no-index --find-links .wh-gpu 'lmalign[deepspeed,liger,qlora]'
    python3 benchmarks/gpu_check.py --time-limit 540 --out gpu_check.json
(here first: python benchmarks/gpu_check.py --plan-only)

FLOPs for MFU: 6 per parameter per trained token (forward 2, backward 4; the input embedding is a
lookup, not counted), plus attention's 12 * layers * hidden * context per token (forward and
backward of QK^T and AV, the context being the mean chat length: padding-free rows attend
within each chat). MFU is printed against the datasheet's dense bf16 peak and against the
matmul case's measured peak on the same device.

One file over 400 lines on purpose: a user copies it to a GPU machine and runs it alone; each case
is a short function beside its entry in CASES.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# Dense bf16 (fp16 for T4) tensor-core peaks from the datasheets, TFLOP/s, by device name.
DATASHEET_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                    "A10": 125.0, "T4": 65.0}
# SmolLM2-1.7B's layers (conf/model/smollm2_1.7b.yaml) on the embedded model's tokenizer.
LARGE_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
               "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152,
               "max_position_embeddings": 8192, "rope_theta": 130000.0}


@dataclass
class Case:
    run: Callable[["Check"], dict[str, Any]]
    what: str
    cap_s: int
    needs_cuda: bool = False
    needs: tuple[str, ...] = ()  # importable packages; absent: "not installed"
    plans: bool = True  # runs through `python -m lmalign` (--plan-only can check its command)


MIN_CASE_S = 30  # a case started with less time than this left could not finish
OUT_OF_TIME = "--time-limit reached; rerun it with --cases"


class CasePlanned(Exception):
    """--plan-only: the case's first command was accepted as a dry run; its memory estimate."""


class CaseFailed(Exception):
    """The case ran and its result is wrong (or it did not finish): the row says why."""


class Check:
    """Where the cases run and what they share (the measured matmul peak)."""

    def __init__(self, work: Path, steps: int, cuda: bool, ends: float = float("inf"),
                 plan_only: bool = False) -> None:
        self.work, self.steps, self.cuda, self.plan_only = work, steps, cuda or plan_only, plan_only
        self.ends = ends  # time.monotonic() by which every case has ended (--time-limit)
        self.cache = work / "cache"
        self.measured_tflops: float | None = None
        self.results: dict[str, Any] = {}  # the rows so far, by case
        self.device = ("(plans only: no GPU used)" if plan_only
                       else torch.cuda.get_device_name(0) if cuda else "cpu")
        self.per_device = 4  # x 2 accumulation: 8 rows of 2048 tokens per step on a GPU

    def shape(self, hardware: str = "a100", packing: bool = True) -> list[str]:
        """The training shape's overrides: the 1.7B shape packed on a GPU, the tiny model here."""
        if not self.cuda:
            return []
        return [f"++model.architecture.{key}={value}" for key, value in LARGE_SHAPE.items()] + [
            "method.max_length=2048", f"method.packing={str(packing).lower()}",
            "method.learning_rate=0.0003",  # the tiny model's 2e-3 is too hot for 1.7B weights
            f"hardware={hardware}", f"hardware.per_device_batch_size={self.per_device}",
            "method.global_batch_size=8"]

    def lmalign(self, run_name: str, *overrides: str, cap_s: int) -> dict[str, Any]:
        """`python -m lmalign` for one run; its run.json."""
        log = self.work / f"{run_name}.log"
        command = [sys.executable, "-m", "lmalign", f"run_name={run_name}", *overrides,
                   *(["dry_run=true"] if self.plan_only else [])]
        left_s = self.ends - time.monotonic()
        if left_s < cap_s:
            cap_s = max(int(left_s), 1)  # the whole check's --time-limit comes first
        try:
            with open(log, "w") as handle:
                done = subprocess.run(command, cwd=self.work, stdout=handle, stderr=handle,
                                      env={**os.environ, "LMALIGN_CACHE": str(self.cache)},
                                      timeout=cap_s)
        except subprocess.TimeoutExpired:
            raise CaseFailed(f"not done within its cap of {cap_s} s; log {log}") from None
        if done.returncode:
            last = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise CaseFailed(f"exit {done.returncode}: {last[0][:160]}; log {log}")
        if self.plan_only:
            memory = next((line.split("memory", 1)[1].split(":")[0].strip()
                           for line in log.read_text().splitlines()
                           if line.strip().startswith("memory ")), "no memory line")
            raise CasePlanned(memory)
        return json.loads((self.work / "runs" / run_name / "run.json").read_text())

    def train(self, run_name: str, *overrides: str, cap_s: int, save_steps: int = 100000,
              **shape: Any) -> dict[str, Any]:
        record = self.lmalign(run_name, "stage=train", "eval=none",
                              f"method.max_steps={self.steps}", f"method.save_steps={save_steps}",
                              "method.logging_steps=5", *self.shape(**shape), *overrides,
                              cap_s=cap_s)
        return record["train"]


def matmul_peak(check: Check) -> dict[str, Any]:
    """The device's measured matrix-product peak: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    size, dtype = (8192, torch.bfloat16) if check.cuda else (1024, torch.float32)
    device = "cuda" if check.cuda else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    if check.cuda:
        torch.cuda.synchronize()
    repeats, began = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    if check.cuda:
        torch.cuda.synchronize()
    check.measured_tflops = 2 * size**3 * repeats / (time.perf_counter() - began) / 1e12
    peak = _datasheet(check.device)
    return {"TFLOP/s": round(check.measured_tflops, 2),
            "datasheet": peak, "of datasheet": _share(check.measured_tflops, peak)}


def sft_full(check: Check) -> dict[str, Any]:
    found = check.train("sft_full", cap_s=CASES["sft_full"].cap_s)
    return {**_throughput(check, found, full=True), **_memory(check, found)}


def sft_option(check: Check, name: str, *overrides: str, **shape: Any) -> dict[str, Any]:
    """SFT with one speed option changed; its tokens/s against sft_full's."""
    found = check.train(name, *overrides, cap_s=CASES[name].cap_s, **shape)
    figures = _throughput(check, found, full=True)
    base = check.results.get("sft_full", {}).get("figures", {}).get("tokens/s")
    figures["vs sft_full"] = f"{figures['tokens/s'] / base:.2f}x" if base else None
    return figures


def bigger_batches(check: Check) -> dict[str, Any]:
    """Per-device batch 8 without accumulation, the global batch unchanged."""
    check.per_device = 8
    try:
        return sft_option(check, "sft_batch8")
    finally:
        check.per_device = 4


def lora(check: Check) -> dict[str, Any]:
    found = check.train("lora", "method=lora", cap_s=CASES["lora"].cap_s)
    return {**_throughput(check, found, full=False), **_memory(check, found, "method=lora")}


def qlora(check: Check) -> dict[str, Any]:
    found = check.train("qlora", "method=lora", "model.quantization=4bit",
                        cap_s=CASES["qlora"].cap_s)
    return {**_throughput(check, found, full=False),
            **_memory(check, found, "method=lora", "model.quantization=4bit")}


def dpo(check: Check, precompute: bool) -> dict[str, Any]:
    name = "dpo_precomputed" if precompute else "dpo"
    found = check.train(name, "method=dpo", "dataset=tiny_prefs",
                        f"method.dpo.precompute_ref_log_probs={str(precompute).lower()}",
                        cap_s=CASES[name].cap_s, packing=False)
    return {"steps/s": round(found["global_step"] / found["train_runtime_s"], 3),
            "peak MiB": round(found["peak_memory_mib"] or 0)}


def sharded(check: Check, name: str, profile: str) -> dict[str, Any]:
    """A one-GPU FSDP2 or ZeRO-3 run through accelerate launch and its workers; final/ loads,
    and its weights moved away from the starting ones."""
    from transformers import AutoModelForCausalLM

    found = check.train(name, "hardware.world_size=1", cap_s=CASES[name].cap_s,
                        save_steps=10, hardware=profile)
    final = check.work / "runs" / name / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    if not finite:
        raise CaseFailed(f"final/ of the {profile} run holds non-finite weights")
    return {**_throughput(check, found, full=True), "final/ reloads": "yes"}


def fp16(check: Check) -> dict[str, Any]:
    """The T4-style profile: fp16 autocast with its loss scaler; the loss must fall."""
    found = check.train("fp16", cap_s=CASES["fp16"].cap_s, save_steps=check.steps,
                        hardware="t4")
    history = _losses(check.work / "runs" / "fp16")
    if not history or not history[-1] < history[0]:
        raise CaseFailed(f"the fp16 loss did not fall: {history[:1]} -> {history[-1:]}")
    return {**_throughput(check, found, full=True), "loss": f"{history[0]:.3f}->{history[-1]:.3f}"}


def harness_on_cuda(check: Check) -> dict[str, Any]:
    """tiny_mc on a tiny model trained here, evaluated on the CPU and on CUDA: per-sample choices
    and accuracy compared."""
    tiny = ["method.max_steps=200", "method.save_steps=100000", "eval=none"]
    check.lmalign("harness_cpu", "stage=train", "hardware=cpu", *tiny,
                  cap_s=CASES["harness_cuda"].cap_s)
    shutil.copytree(check.work / "runs" / "harness_cpu", check.work / "runs" / "harness_cuda",
                    dirs_exist_ok=True)
    evaluation = ["stage=eval", "eval.harness.tasks=[tiny_mc]", "eval.harness.log_samples=true",
                  "eval.checkpoints=[final]"]
    check.lmalign("harness_cpu", *evaluation, "hardware=cpu", cap_s=CASES["harness_cuda"].cap_s)
    check.lmalign("harness_cuda", *evaluation, "hardware=a100",
                  cap_s=CASES["harness_cuda"].cap_s)
    cpu, cuda = (_choices(check.work / "runs" / run) for run in ("harness_cpu", "harness_cuda"))
    same = sum(cpu[key] == cuda.get(key) for key in cpu) / max(len(cpu), 1)
    accuracy = {name: sum(v[1] for v in found.values()) / max(len(found), 1)
                for name, found in (("cpu", cpu), ("cuda", cuda))}
    n = max(len(cpu), 1)
    stderr = (accuracy["cpu"] * (1 - accuracy["cpu"]) / n) ** 0.5
    if same < 0.99 or abs(accuracy["cpu"] - accuracy["cuda"]) > max(stderr, 1e-9):
        raise CaseFailed(f"choices equal {same:.1%}; accuracy cpu {accuracy['cpu']:.3f} "
                         f"cuda {accuracy['cuda']:.3f} (stderr {stderr:.3f})")
    return {"same choices": f"{same:.1%}", "acc cpu": round(accuracy["cpu"], 3),
            "acc cuda": round(accuracy["cuda"], 3)}


def generate(check: Check) -> dict[str, Any]:
    """eval=generate with the in-process engine on the tiny model: answers come back."""
    hardware = "hardware=a100" if check.cuda else "hardware=cpu"
    record = check.lmalign("generate", "method.max_steps=20", "method.save_steps=100000",
                           "eval=generate", "eval.generate.prompts=tiny",
                           "eval.generate.max_prompts=16", hardware,
                           cap_s=CASES["generate"].cap_s)
    if record.get("status") != "done":
        raise CaseFailed(f"the run ended {record.get('status')}")
    answers = list((check.work / "runs" / "generate" / "eval").rglob("generations.jsonl"))
    lines = sum(len(p.read_text().splitlines()) for p in answers)
    if lines < 32:  # base and final
        raise CaseFailed(f"{lines} generations written, 2 x 16 asked for")
    return {"generations": lines}


GRPO_BATCH = 32  # completions per step: 4 prompts x 8


def grpo(check: Check, vllm: bool) -> dict[str, Any]:
    """GRPO on tiny_prompts from the embedded model (bf16 on a GPU): every step logs its reward
    and KL and saves its completions; figures are steps/s and completion tokens/s."""
    name = "grpo_vllm" if vllm else "grpo"
    hardware = "hardware=a100" if check.cuda else "hardware=cpu"
    found = check.lmalign(name, "stage=train", "eval=none", "method=grpo", "dataset=tiny_prompts",
                          f"method.max_steps={check.steps}", f"method.save_steps={check.steps}",
                          "method.logging_steps=1", f"method.global_batch_size={GRPO_BATCH}",
                          hardware, *(["method.grpo.vllm_mode=colocate"] if vllm else []),
                          cap_s=CASES[name].cap_s)["train"]
    run_dir = check.work / "runs" / name
    state = run_dir / "checkpoints" / f"checkpoint-{check.steps}" / "trainer_state.json"
    steps = [h for h in json.loads(state.read_text())["log_history"] if "reward" in h]
    saved = list((run_dir / "checkpoints" / "completions").glob("completions_*.parquet"))
    if len(steps) != check.steps or not all("kl" in h for h in steps) or not saved:
        raise CaseFailed(f"{len(steps)} of {check.steps} steps logged a reward, "
                         f"{len(saved)} completion files")
    generated = sum(h["completions/mean_length"] for h in steps) * GRPO_BATCH
    return {"steps/s": round(found["global_step"] / found["train_runtime_s"], 3),
            "completion tokens/s": round(generated / found["train_runtime_s"]),
            "reward": f"{steps[0]['reward']:.3f}->{steps[-1]['reward']:.3f}"}


CASES: dict[str, Case] = {
    "matmul": Case(matmul_peak, "measured matrix-product peak", 60, plans=False),
    "sft_full": Case(sft_full, "SFT, all weights", 240),
    "sft_fused_adamw": Case(lambda c: sft_option(c, "sft_fused_adamw",
                                                 "method.optim=adamw_torch_fused"),
                            "SFT, fused AdamW", 240),
    "sft_liger": Case(lambda c: sft_option(c, "sft_liger", "hardware.liger_kernel=true"),
                      "SFT, Liger kernels", 240, needs_cuda=True, needs=("liger_kernel",)),
    "sft_compile": Case(lambda c: sft_option(c, "sft_compile", "hardware.torch_compile=true"),
                        "SFT, torch.compile", 300),
    "sft_padded": Case(lambda c: sft_option(c, "sft_padded", packing=False),
                       "SFT, padded batches instead of bfd packing", 240),
    "sft_batch8": Case(bigger_batches, "SFT, per-device batch 8, no accumulation", 240),
    "lora": Case(lora, "LoRA SFT", 240),
    "qlora": Case(qlora, "QLoRA SFT (4-bit base)", 240, needs_cuda=True, needs=("bitsandbytes",)),
    "dpo": Case(lambda c: dpo(c, False), "DPO, reference model in step", 240),
    "dpo_precomputed": Case(lambda c: dpo(c, True), "DPO, reference log-probs precomputed", 240),
    "fsdp2": Case(lambda c: sharded(c, "fsdp2", "8gpu_fsdp"),
                  "FSDP2 on one GPU, accelerate launch", 300, needs_cuda=True),
    "zero3": Case(lambda c: sharded(c, "zero3", "8gpu_zero3"),
                  "ZeRO-3 on one GPU, accelerate launch", 300, needs_cuda=True,
                  needs=("deepspeed",)),
    "fp16": Case(fp16, "fp16 with the loss scaler (T4 profile)", 240, needs_cuda=True),
    "harness_cuda": Case(harness_on_cuda, "lm-eval on CUDA vs CPU, tiny_mc", 300,
                         needs_cuda=True),
    "generate": Case(generate, "eval=generate, in-process engine", 240),
    "grpo": Case(lambda c: grpo(c, vllm=False), "GRPO, generation in the training process", 240),
    "grpo_vllm": Case(lambda c: grpo(c, vllm=True), "GRPO, vLLM colocated", 300,
                      needs_cuda=True, needs=("vllm",)),
}


def _datasheet(device: str) -> float | None:
    return next((tflops for name, tflops in DATASHEET_TFLOPS.items() if name in device), None)


def _share(value: float | None, of: float | None) -> str | None:
    return f"{value / of:.1%}" if value and of else None


def _throughput(check: Check, found: dict[str, Any], full: bool) -> dict[str, Any]:
    tokens_per_s = found.get("train_tokens_per_s") or 0.0
    figures: dict[str, Any] = {"tokens/s": round(tokens_per_s)}
    if full:
        flops = tokens_per_s * _flops_per_token(check, found) / 1e12
        figures["TFLOP/s"] = round(flops, 2)
        figures["MFU datasheet"] = _share(flops, _datasheet(check.device))
        figures["MFU measured"] = _share(flops, check.measured_tflops)
    return figures


def _flops_per_token(check: Check, found: dict[str, Any]) -> float:
    """6N (N without the input embedding) + 12 * layers * hidden * mean chat length."""
    from lmalign import plan
    from conftest import typed_config

    config = typed_config(*check.shape())
    arch = config.model.architecture
    embedding = plan.meta_model(config, None).get_input_embeddings().weight.numel()
    parameters = found["total_parameters"] - (0 if arch.get("tie_word_embeddings") else embedding)
    context = _mean_chat_tokens(check)
    return 6 * parameters + 12 * arch["num_hidden_layers"] * arch["hidden_size"] * context


def _mean_chat_tokens(check: Check) -> float:
    from lmalign import data
    from transformers import AutoTokenizer
    from conftest import typed_config

    config = typed_config("dataset.max_samples=64")
    train, _ = data.load_splits(config.dataset)
    tokenizer = AutoTokenizer.from_pretrained(
        next((check.cache / "embedded").glob("tiny-*")))
    lengths = [len(tokenizer.apply_chat_template(row["messages"])) for row in train]
    return sum(lengths) / len(lengths)


def _memory(check: Check, found: dict[str, Any], *overrides: str) -> dict[str, Any]:
    """The measured peak against the dry-run plan's estimate (weights, gradients, optimizer and
    one micro-batch's activations, traced on the meta device)."""
    from lmalign import memory, plan
    from conftest import typed_config

    config = typed_config(*check.shape(), *overrides)
    estimate = memory.estimate(config, plan.meta_model(config, None))
    measured = (found.get("peak_memory_mib") or 0) * 2**20
    return {"peak MiB": round(measured / 2**20),
            "plan MiB": round(estimate.total / 2**20),
            "of which activations": round((estimate.activations or 0) / 2**20),
            "peak/plan": f"{measured / estimate.total:.2f}" if estimate.total else None}


def _losses(run_dir: Path) -> list[float]:
    state = sorted(run_dir.glob("checkpoints/checkpoint-*/trainer_state.json"),
                   key=lambda p: int(p.parent.name.split("-")[1]))
    history = json.loads(state[-1].read_text())["log_history"] if state else []
    return [entry["loss"] for entry in history if "loss" in entry]


def _choices(run_dir: Path) -> dict[int, tuple[int, int]]:
    """{doc_id: (chosen option, correct)} from lm-eval's per-sample file of the final model."""
    found = {}
    for samples in (run_dir / "eval").rglob("samples_tiny_mc_*.jsonl"):
        for line in samples.read_text().splitlines():
            sample = json.loads(line)
            scores = [float(r[0]) for r in sample["filtered_resps"]]
            found[sample["doc_id"]] = (scores.index(max(scores)), int(sample["acc"]))
    return found


def run_case(name: str, check: Check) -> dict[str, Any]:
    case = CASES[name]
    row: dict[str, Any] = {"case": name, "what": case.what}
    missing = [package for package in case.needs if _absent(package)]
    if check.plan_only:
        if not case.plans:
            return {**row, "status": "not run", "why": "--plan-only: nothing to plan"}
        missing = []  # a plan needs none of the case's packages
    if case.needs_cuda and not check.cuda:
        return {**row, "status": "not run", "why": "needs a CUDA GPU"}
    if missing:
        return {**row, "status": "not run", "why": f"not installed: {', '.join(missing)}"}
    if check.ends - time.monotonic() < MIN_CASE_S:
        return {**row, "status": "not run", "why": OUT_OF_TIME}
    began = time.perf_counter()
    try:
        figures = case.run(check)
        row.update(status="pass", figures=figures)
    except CasePlanned as exc:
        row.update(status="planned", figures={"plan": str(exc)})
    except CaseFailed as exc:
        row.update(status="fail", why=str(exc))
    except Exception as exc:  # a broken case is a failed row, not the end of the check
        row.update(status="fail", why=f"{type(exc).__name__}: {exc}"[:300])
    row["seconds"] = round(time.perf_counter() - began, 1)
    return row


def _absent(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is None


def write(out: Path, results: dict[str, Any]) -> None:
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    partial.replace(out)


def table(results: dict[str, Any]) -> str:
    lines = [f"{'case':16} {'status':8} {'s':>6}  figures / why"]
    for name, row in results["cases"].items():
        detail = ", ".join(f"{k} {v}" for k, v in row.get("figures", {}).items() if v is not None)
        lines.append(f"{name:16} {row['status']:8} {row.get('seconds', ''):>6}  "
                     f"{detail or row.get('why', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training case")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a new one)")
    parser.add_argument("--plan-only", action="store_true",
                        help="no GPU needed: each case's first command as a dry run (the GPU "
                             "shape and profile), to see that it is accepted; writes no JSON")
    parser.add_argument("--time-limit", type=int, default=None, metavar="S",
                        help="end every case within S seconds; those that would start later are "
                             "'not run' (the --cases order is the priority)")
    options = parser.parse_args(argv)
    if options.steps < 1:
        print(f"error: --steps {options.steps}: at least 1 optimizer step", file=sys.stderr)
        return 2
    if options.time_limit is not None and options.time_limit < MIN_CASE_S:
        print(f"error: --time-limit {options.time_limit}: at least {MIN_CASE_S} seconds, the "
              "least a case is started with", file=sys.stderr)
        return 2
    chosen = [name.strip() for name in options.cases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in CASES]
    if unknown:
        print(f"error: --cases: {', '.join(unknown)} unknown; one of {', '.join(CASES)}",
              file=sys.stderr)
        return 2
    out = Path(options.out)
    results = json.loads(out.read_text()) if out.exists() and not options.plan_only \
        else {"cases": {}}
    work = Path(options.work or tempfile.mkdtemp(prefix="lmalign-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ends = time.monotonic() + options.time_limit if options.time_limit else float("inf")
    check = Check(work, options.steps, torch.cuda.is_available(), ends, options.plan_only)
    check.results = results["cases"]
    results.update(device=check.device, torch=torch.__version__, work=str(work))
    if "matmul" not in chosen and results["cases"].get("matmul", {}).get("status") == "pass":
        check.measured_tflops = results["cases"]["matmul"]["figures"]["TFLOP/s"]
    for index, name in enumerate(chosen):
        print(f"{name}: {CASES[name].what} ...", flush=True)
        try:
            row = run_case(name, check)
        except KeyboardInterrupt:  # the case's own lmalign command stopped on it as well
            kept = ("no case of this command ended" if not index else "the plans above"
                    if options.plan_only else f"the cases before it are in {out}")
            print(f"stopped: interrupted (Ctrl-C) in {name}; {kept}; finish with --cases "
                  f"{','.join(chosen[index:])}", file=sys.stderr)
            return 130
        if row.get("why") == OUT_OF_TIME and name in results["cases"]:
            print(f"{name}: {row['why']}; its earlier row stays", flush=True)
            continue
        results["cases"][name] = row
        if not options.plan_only:
            write(out, results)
    print(f"\n{check.device}, torch {torch.__version__}, runs in {work}\n{table(results)}")
    return 1 if any(row["status"] == "fail" for row in results["cases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
