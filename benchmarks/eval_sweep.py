"""A checkpoint x few-shot evaluation: one lmalign command versus one `lm_eval` call per cell.

    python benchmarks/eval_sweep.py [--checkpoints 3] [--fewshot 0 2] [--limit 40]

For each model size (the embedded tiny model, and a random-initialised 106M-parameter Llama with
SmolLM2-135M's layers, built from its seed like the tiny one), a short lmalign run saves C
checkpoints. Then, on the same checkpoints, task (tiny_mc) and limit, in this one run:
  - lmalign: `python -m lmalign stage=eval eval.checkpoints=all eval.harness.num_fewshot=[...]`, one
    process that loads each checkpoint once and builds one lm-eval task registry;
  - separate calls: `python -m lm_eval --model hf ...` once per checkpoint x few-shot value, as a
    bash loop would, each loading the model and scanning lm-eval's task configs again.
Printed: wall times, their ratio, and whether every cell's accuracy agrees. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASK = "tiny_mc"
SIZES = {
    "tiny": [],
    # SmolLM2-135M's layers (conf/model/smollm2_135m.yaml) with the tiny model's vocabulary:
    # 106M parameters, randomly initialised from the seed.
    "106M": ["model.architecture.hidden_size=576", "model.architecture.intermediate_size=1536",
             "model.architecture.num_hidden_layers=30", "model.architecture.num_attention_heads=9",
             "model.architecture.num_key_value_heads=3"],
}


def lmalign(*overrides: str, cwd: Path, cache: Path) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmalign", *overrides], cwd=cwd, check=True,
                   env={**os.environ, "LMALIGN_CACHE": str(cache)}, capture_output=True)
    return time.perf_counter() - began


def lm_eval_call(checkpoint: Path, shots: int, limit: int, output: Path) -> tuple[float, float]:
    """(seconds, accuracy) of one lm_eval command line call."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={checkpoint},dtype=float32", "--tasks", TASK,
                    "--include_path", str(REPO / "lmalign" / "tasks"), "--num_fewshot",
                    str(shots), "--limit", str(limit), "--seed", "0", "--batch_size", "32",
                    "--device", "cpu", "--apply_chat_template", "--output_path", str(output)],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - began
    written = json.loads(next(output.rglob("results_*.json")).read_text())
    return seconds, written["results"][TASK]["acc,none"]


def measure(size: str, checkpoints: int, fewshot: list[int], limit: int, home: Path,
            cache: Path) -> None:
    model = SIZES[size]
    lmalign("stage=train", f"run_name={size}", f"method.max_steps={checkpoints}",
            "method.save_steps=1", "eval=none", "dataset.max_samples=256", *model,
            cwd=home, cache=cache)
    run_dir = home / "runs" / size
    ours_s = lmalign("stage=eval", f"run_name={size}", "eval.checkpoints=all",
                     f"eval.harness.num_fewshot=[{','.join(map(str, fewshot))}]",
                     f"eval.harness.limit={limit}",
                     f"eval.harness.tasks=[{TASK}]", *model, cwd=home, cache=cache)
    ours = {}
    for record in (run_dir / "eval").glob("checkpoint-*/*/cell.json"):
        cell = json.loads(record.read_text())
        acc = next(r["value"] for r in cell["rows"] if r["metric"] == "acc")
        ours[(cell["checkpoint"], cell["settings"]["num_fewshot"])] = acc
    separate_s, agree = 0.0, True
    for step in range(1, checkpoints + 1):
        for shots in fewshot:
            label = f"checkpoint-{step}"
            seconds, acc = lm_eval_call(run_dir / "checkpoints" / label, shots, limit,
                                        home / "cli" / size / f"{label}-{shots}")
            separate_s += seconds
            agree &= abs(acc - ours[(label, shots)]) < 1e-9
    cells = checkpoints * len(fewshot)
    print(f"{size:>5}: {cells} cells | lmalign {ours_s:6.1f} s | {cells} lm_eval calls "
          f"{separate_s:6.1f} s | ratio lmalign/separate {ours_s / separate_s:.2f} | "
          f"accuracies {'identical' if agree else 'DIFFER'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--fewshot", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    options = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="lmalign-eval-bench-"))
    cache = home / "cache"
    print(f"{options.checkpoints} checkpoints x few-shot {options.fewshot} on {TASK} "
          f"(limit {options.limit}), in {home}", flush=True)
    for size in options.sizes:
        measure(size, options.checkpoints, options.fewshot, options.limit, home, cache)


if __name__ == "__main__":
    main()
