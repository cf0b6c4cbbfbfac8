"""eval=generate's hf engine against the loops users write, and the judge's throughput.

    python benchmarks/generate_judge.py [--prompts 64] [--new-tokens 64] [--batch-size 16]
                                        [--judgments 400] [--latency 0.2] [--skip-generate]

1. Generation, on a random-initialised 106M-parameter Llama (SmolLM2-135M's layers with the
   tiny model's vocabulary, built from its seed as benchmarks/eval_sweep.py does), on CPU, fp32,
   greedy, the tiny prompt set through the chat template, every answer exactly --new-tokens long
   (min_new_tokens = max_new_tokens on every side), KV cache on, in this one run:
   - lmalign: `generate.evaluate` of one checkpoint (the engine, its shards and its cell);
   - a plain batched loop: the same batch size, left padding, one `model.generate` per batch;
   - one prompt at a time: the sequential loop users fall back to.
   Each side loads the model itself and is timed from load to the last answer.
2. The judge: --judgments requests through lmalign's judge (concurrency 16) against the test
   judge server (tests/judge_server.py) answering each after --latency seconds; the ideal is
   judgments x latency / 16.
Printed: times and ratios. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
ARCHITECTURE_106M = ["model.architecture.hidden_size=576",
                     "model.architecture.intermediate_size=1536",
                     "model.architecture.num_hidden_layers=30",
                     "model.architecture.num_attention_heads=9",
                     "model.architecture.num_key_value_heads=3"]


def _config(*overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lmalign.config_tree import CONF_DIR, register_resolvers
    from lmalign.validate import validate

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        composed = compose("config", overrides=list(overrides))
    return validate(OmegaConf.to_container(composed, resolve=True))


def bench_generate(args: argparse.Namespace, cache: Path, work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmalign import models
    from lmalign.evaluation import generate, prompts
    from lmalign.evaluation.cells import Target

    settings = ["stage=eval", "eval=generate", "eval.generate.prompts=tiny",
                f"eval.generate.max_prompts={args.prompts}",
                f"eval.generate.max_new_tokens={args.new_tokens}", "eval.generate.temperature=0",
                f"eval.generate.batch_size={args.batch_size}", "eval.generate.engine=hf",
                f"+eval.generate.extra.min_new_tokens={args.new_tokens}",
                f"cache.build_dir={cache}", *ARCHITECTURE_106M]
    config = _config(*settings)
    start = models.starting_point(config)  # builds the 106M model once, outside the timings
    chosen = prompts.load(config.eval.generate)
    print(f"generation: {len(chosen)} prompts, {args.new_tokens} new tokens each, batch "
          f"{args.batch_size}, greedy, fp32, left padding, KV cache, {torch.get_num_threads()} "
          "threads; each side loads the model", flush=True)

    began = time.perf_counter()
    generate.evaluate([Target("base", 0, start.path)], config.eval, work / "run", config.model,
                      config.hardware)
    lmalign_s = time.perf_counter() - began

    def plain(batch_size: int) -> float:
        began = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(start.tokenizer)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(start.path, dtype=torch.float32).eval()
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.turns[0]}],
                                               add_generation_prompt=True, tokenize=False)
                 for p in chosen]
        for index in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[index:index + batch_size], return_tensors="pt",
                                padding=True, add_special_tokens=False)
            with torch.no_grad():
                model.generate(**encoded, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - began

    batched_s = plain(args.batch_size)
    sequential_s = plain(1)
    print(f"  lmalign eval=generate (hf engine): {lmalign_s:7.1f} s")
    print(f"  plain batched generate loop:       {batched_s:7.1f} s   lmalign speed vs it: "
          f"{batched_s / lmalign_s:.2f}x (target >= 0.9)")
    print(f"  one prompt at a time:              {sequential_s:7.1f} s   lmalign speed-up: "
          f"{sequential_s / lmalign_s:.1f}x (target >= 4)", flush=True)


def bench_judge(args: argparse.Namespace, cache: Path) -> None:
    from judge_server import JudgeServer

    from lmalign.evaluation import judge, rubrics
    from lmalign.evaluation.judge import Ask

    with JudgeServer(latency_s=args.latency) as server:
        config = _config("eval=[generate,judge]", "eval.judge.model=test-judge",
                         f"eval.judge.base_url={server.url}", "eval.judge.api_key_env=null",
                         "eval.judge.concurrency=16")
        rubric = rubrics.load("mt_bench")
        asks = [Ask(f"q{i}", None, 0, 0, None,
                    [{"role": "user", "content": f"[Question]\nWhich is the largest: 1 9 2 "
                      f"7?\n\n[The Start of Assistant's Answer]\nThe largest is 9. ({i})\n"
                      "[The End of Assistant's Answer]"}]) for i in range(args.judgments)]
        began = time.perf_counter()
        judge._ask_all(asks, config.eval.judge, rubric, cache / "judgments", "bench",
                       server.url)
        took = time.perf_counter() - began
    ideal = args.judgments * args.latency / 16
    valid = sum(bool(a.reply.get("text")) for a in asks)
    print(f"judge: {args.judgments} judgments ({valid} answered), {args.latency * 1000:.0f} ms "
          f"each, concurrency 16: {took:.1f} s; ideal {ideal:.1f} s; ratio {took / ideal:.2f} "
          "(target <= 1.5)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--judgments", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--skip-generate", action="store_true")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        cache = Path(os.environ.get("LMALIGN_CACHE", work / "cache")).expanduser()
        if not args.skip_generate:
            bench_generate(args, cache, work)
        bench_judge(args, work)


if __name__ == "__main__":
    main()
