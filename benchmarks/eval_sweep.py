"""A checkpoint x few-shot evaluation: one lmalign command versus one `lm_eval` call per cell.

    python benchmarks/eval_sweep.py [--checkpoints 3] [--fewshot 0 2] [--limit 40]

For each model size (the embedded tiny model, and a random-initialised 106M-parameter Llama with
SmolLM2-135M's layers, built from its seed like the tiny one), a short lmalign run saves C
checkpoints. Then, on the same checkpoints, task (tiny_mc) and limit, in this one run:
  - lmalign: `python -m lmalign stage=eval eval.checkpoints=all eval.harness.num_fewshot=[...]`, one
    process that loads each checkpoint once and builds one lm-eval task registry;
  - separate calls: `python -m lm_eval --model hf ...` once per checkpoint x few-shot value, as a
    bash loop would, each loading the model and scanning lm-eval's task configs again.
  - the forward-compute floor: the same cells' loglikelihood requests (read from lmalign's
    per-sample files), each checkpoint loaded once outside the clock, through the bare model's
    forward pass in batches of 32 sorted by length: what no evaluation of these cells can beat.
Both sides log per-sample files (lmalign `eval.harness.log_samples=true`, lm_eval
`--log_samples`), so they do the same work. Printed: wall times, their ratio, lmalign's distance
to the floor, and whether every cell's accuracy agrees (the floor's too). Nothing is asserted.
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
                    "--device", "cpu", "--apply_chat_template", "--log_samples",
                    "--output_path", str(output)],
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
                     f"eval.harness.tasks=[{TASK}]", "eval.harness.log_samples=true", *model,
                     cwd=home, cache=cache)
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
    floor_s, floor_acc = forward_floor(run_dir)
    floor_agrees = all(abs(floor_acc[key] - ours[key]) < 1e-9 for key in ours)
    cells = checkpoints * len(fewshot)
    print(f"{size:>5}: {cells} cells | lmalign {ours_s:6.1f} s | {cells} lm_eval calls "
          f"{separate_s:6.1f} s | ratio lmalign/separate {ours_s / separate_s:.2f} | "
          f"accuracies {'identical' if agree else 'DIFFER'}\n"
          f"       forward floor {floor_s:6.1f} s (accuracies "
          f"{'identical' if floor_agrees else 'DIFFER'}) | lmalign {ours_s / floor_s:.1f}x the "
          f"floor, {ours_s - floor_s:.1f} s above it", flush=True)


def forward_floor(run_dir: Path) -> tuple[float, dict[tuple[str, int], float]]:
    """(seconds of forward passes alone, accuracy per (checkpoint, shots)) for the requests in
    lmalign's per-sample files: log P(choice | context) summed over the choice's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seconds, accuracy = 0.0, {}
    for checkpoint in sorted((run_dir / "eval").glob("checkpoint-*")):
        path = run_dir / "checkpoints" / checkpoint.name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        for samples in checkpoint.glob("*/samples_*.jsonl"):
            shots = json.loads((samples.parent / "cell.json").read_text())["settings"][
                "num_fewshot"]
            docs = [json.loads(line) for line in samples.read_text().splitlines()]
            requests = [(d["doc_id"], i, a["arg_0"], a["arg_1"]) for d in docs
                        for i, a in enumerate(d["arguments"].values())]
            scores, spent = _loglikelihoods(model, tokenizer, requests)
            seconds += spent
            right = [max(range(len(d["arguments"])), key=lambda i: scores[d["doc_id"], i])
                     == int(d["target"]) for d in docs]
            accuracy[(checkpoint.name, shots)] = sum(right) / len(right)
    return seconds, accuracy


def _loglikelihoods(model, tokenizer, requests, batch_size: int = 32):
    import torch

    encoded = []
    for doc, choice, context, continuation in requests:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        encoded.append(((doc, choice), whole, len(context_ids)))
    encoded.sort(key=lambda item: -len(item[1]))
    scores, seconds = {}, 0.0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = len(batch[0][1])
        ids = torch.tensor([w + [0] * (width - len(w)) for _, w, _ in batch])
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for _, w, _ in batch])
        began = time.perf_counter()
        with torch.inference_mode():
            log_probs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        seconds += time.perf_counter() - began
        for row, (key, whole, context_length) in enumerate(batch):
            targets = torch.tensor(whole[context_length:])
            positions = torch.arange(context_length - 1, len(whole) - 1)
            scores[key] = log_probs[row, positions, targets].sum().item()
    return scores, seconds


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
