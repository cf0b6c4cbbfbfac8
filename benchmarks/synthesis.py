"""stage=synthesize's two engines against the plain way, on a 106M-parameter model on this CPU.

    python benchmarks/synthesis.py [--items 32] [--new-tokens 32] [--batch-size 16]

Generation: the stage's batched sampling (lmalign.synthesis.engines, batches of
synth.batch_size, left-padded, one `generate` per batch) against one `generate` call per item, on
the same prompts: Magpie pre-query texts (instructions) and chat prompts (responses). A
random-initialised model never writes its end-of-turn text, so both sides make exactly
`--new-tokens` tokens per item: the same work.

Scoring: lmalign.scoring.score (sorted by length, so each batch pads little) against a plain
batched forward loop in the items' own order (right-padded, the last real token's score), both
on a sequence-classification model of the same shape, on chats of varied length.

The model is SmolLM2-135M's layers with the tiny model's vocabulary (106M parameters, as
benchmarks/eval_sweep.py), built from its seed. Printed: items/s of each side and their ratio,
and whether the two scorings agree. Nothing is asserted. The issue's targets: generation >= 4x,
scoring >= 0.9.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

ARCHITECTURE = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "max_position_embeddings": 2048, "tie_word_embeddings": True}


def _prompts(tokenizer, count: int) -> tuple[list[str], list[str]]:
    """(pre-query texts, chat prompts): what the instruction and response steps generate from."""
    from lmalign import tinytask
    from lmalign.synthesis import magpie

    pre_query = magpie.pre_query(tokenizer.chat_template, tokenizer.bos_token or "",
                                 tokenizer.eos_token or "").text
    questions = [r["prompt"] for r in tinytask.generate("validation", count)]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                           add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [pre_query] * count, chats


def _one_at_a_time(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    import torch

    began = time.perf_counter()
    for index, prompt in enumerate(prompts):
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(index)
        with torch.inference_mode():
            model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=True, temperature=1.0, top_p=1.0,
                           pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - began


def _batched(model, tokenizer, prompts: list[str], new_tokens: int, batch_size: int) -> float:
    from lmalign.synthesis.engines import _generate

    began = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        made = _generate(model, tokenizer, prompts[start:start + batch_size], 1.0, 1.0,
                         new_tokens, None, start, deadline_s=3600)
        assert made is not None
    return time.perf_counter() - began


def _chats(count: int) -> list[list[dict[str, str]]]:
    """Conversations from a few words to a few hundred: what a reward model scores."""
    from lmalign import tinytask

    draw = random.Random(0)
    chats = []
    for record in tinytask.generate("validation", count):
        answer = " ".join([record["answer"]] * draw.choice([1, 2, 4, 8]))
        chats.append([{"role": "user", "content": record["prompt"]},
                      {"role": "assistant", "content": answer}])
    return chats


def _plain_scores(model, tokenizer, chats, batch_size: int, max_length: int) -> list[float]:
    import torch

    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(chats), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False)
                     for c in chats[start:start + batch_size]]
            tokenizer.padding_side = "right"
            batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length, add_special_tokens=False)
            logits = model(**batch).logits.float().view(-1)
            scores += logits.tolist()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--score-items", type=int, default=64)
    arguments = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, \
        AutoTokenizer

    from lmalign import embedded, scoring

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as home:
        path = embedded.materialize("bench106m", ARCHITECTURE, 0, Path(home))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        count = sum(p.numel() for p in model.parameters())
        print(f"model: {count / 1e6:.0f}M parameters (random, SmolLM2-135M's layers), "
              f"{torch.get_num_threads()} threads")
        instructions, chats = _prompts(tokenizer, arguments.items)
        print(f"\ngeneration: {arguments.items} items x {arguments.new_tokens} new tokens, "
              f"batches of {arguments.batch_size}")
        print("step          one at a time   batched        ratio")
        for step, prompts in (("instructions", instructions), ("responses", chats)):
            alone = _one_at_a_time(model, tokenizer, prompts, arguments.new_tokens)
            batched = _batched(model, tokenizer, prompts, arguments.new_tokens,
                               arguments.batch_size)
            print(f"{step:<13} {len(prompts) / alone:7.2f} items/s  "
                  f"{len(prompts) / batched:7.2f} items/s  {alone / batched:5.2f}x")

        scorer = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
        scoring.prepare(scorer, tokenizer)
        items = _chats(arguments.score_items)
        _plain_scores(scorer, tokenizer, items[:8], arguments.batch_size, 2048)  # warm up
        began = time.perf_counter()
        plain = _plain_scores(scorer, tokenizer, items, arguments.batch_size, 2048)
        plain_s = time.perf_counter() - began
        began = time.perf_counter()
        ours = scoring.score(scorer, tokenizer, items, arguments.batch_size, 2048)
        ours_s = time.perf_counter() - began
        agree = max(abs(a - b) for a, b in zip(plain, ours))
        print(f"\nscoring: {len(items)} chats, batches of {arguments.batch_size}")
        print(f"plain batched loop {len(items) / plain_s:7.1f} items/s; lmalign "
              f"{len(items) / ours_s:7.1f} items/s; ratio {plain_s / ours_s:.2f} "
              f"(largest score difference {agree:.1e})")


if __name__ == "__main__":
    main()
