"""eval=generate: answers to a prompt set for every checkpoint, one resumable cell each
(docs/design.md, Evaluation backends).

A cell's answers are made turn by turn: every (prompt, sample) answers turn 1, then turn 2 is
asked with the model's own turn-1 answer in the history, as MT-Bench does. Each batch's answers
land in an atomic shard in the cell's work directory (`<cell>.partial/shards/`) as they are made,
so a killed run resumes at the next unfinished answer and never makes one twice; once every
answer exists the cell is written whole: `generations.jsonl`, then `cell.json`.

Metrics (each a fraction except mean_new_tokens, a count of tokens):
- `eos_rate`: the share of answers that ended with the model's EOS token (the rest hit
  max_new_tokens).
- `repetition`: the share of answers whose tail is a loop: the same piece of 1 to 100
  characters three or more times in a row at the very end, covering at least 12 characters.
- `mean_new_tokens`: tokens generated per answer, EOS included.
- `distinct_2`: distinct word bigrams over all word bigrams of the cell's answers.

Over 400 lines: both engines, the shards they share, the metrics and samples.md are one
backend's path; splitting them would scatter the shard format across modules.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmalign import models, rundir
from lmalign.errors import UserError, problem
from lmalign.evaluation import cells, prompts, server
from lmalign.evaluation.cells import Target
from lmalign.evaluation.prompts import Prompt
from lmalign.schema import EvalConfig, GenerateConfig, HardwareConfig, ModelConfig

log = logging.getLogger(__name__)
GENERATIONS = "generations.jsonl"
SAMPLES_MD = "samples.md"
SHARDS = "shards"


def settings(evaluation: EvalConfig, hardware: HardwareConfig, target: Target) -> dict[str, Any]:
    """Everything that changes the answers; part of a cell's identity: the engine that answers
    (`auto` resolved), and a prompts file's content (its hash), so an edited file makes new
    cells."""
    generate = evaluation.generate
    found = {"backend": "generate", "prompts": generate.prompts,
             "columns": dict(generate.columns), "max_prompts": generate.max_prompts,
             "system_prompt": generate.system_prompt, "num_samples": generate.num_samples,
             "temperature": generate.temperature, "top_p": generate.top_p,
             "max_new_tokens": generate.max_new_tokens,
             "engine": engine(generate, hardware, target),
             "extra": dict(generate.extra), "seed": evaluation.seed}
    if generate.prompts not in prompts.NAMED:
        found["prompts_sha256"] = cells.content_hash(Path(generate.prompts).expanduser())
    return found


def requested_cells(targets: list[Target], evaluation: EvalConfig, hardware: HardwareConfig,
                    run_dir: Path) -> list[Path]:
    return [cells.cell_dir(run_dir, target, settings(evaluation, hardware, target))
            for target in targets]


def check(evaluation: EvalConfig) -> list[str]:
    """Before anything trains or loads: the prompt set is there and readable."""
    return prompts.check(evaluation.generate)


def evaluate(targets: list[Target], evaluation: EvalConfig, run_dir: Path, model: ModelConfig,
             hardware: HardwareConfig, accelerator=None) -> None:
    """Every missing cell of these targets; then samples.md, every checkpoint side by side.
    With an accelerator of several processes (engine=hf in the evaluation workers), each
    process answers every N-th batch of the same batches one process would make, so the
    answers do not depend on the process count; the main process writes the cells."""
    chosen = prompts.load(evaluation.generate)
    if evaluation.generate.engine == "auto" and hardware.accelerator == "cuda" \
            and not shutil.which("vllm"):
        log.warning("eval.generate.engine=auto: vLLM is not installed, so answers come from the "
                    "hf engine in this process (install vllm, or set eval.generate.engine=hf to "
                    "silence this)")
    for target in targets:
        cell = cells.cell_dir(run_dir, target, settings(evaluation, hardware, target))
        if cells.is_complete(cell):
            log.info("eval %s: generate cell done, skipping", target.label)
            continue
        log.info("eval %s: %d prompt(s) of %s x %d sample(s) -> %s", target.label, len(chosen),
                 evaluation.generate.prompts, evaluation.generate.num_samples,
                 cell.relative_to(run_dir))
        _generate_cell(target, evaluation, chosen, cell, model, hardware, accelerator)
    if accelerator is None or accelerator.is_main_process:
        write_samples(run_dir)


def _generate_cell(target: Target, evaluation: EvalConfig, chosen: list[Prompt], cell: Path,
                   model: ModelConfig, hardware: HardwareConfig, accelerator=None) -> None:
    generate = evaluation.generate
    work = cell.with_name(cell.name + ".partial")
    (work / SHARDS).mkdir(parents=True, exist_ok=True)
    rank, processes = (accelerator.process_index, accelerator.num_processes) if accelerator \
        else (0, 1)

    def in_step() -> dict[tuple[str, int, int], dict[str, Any]]:
        """Every process reads the same shards: the answers so far, of all processes. One
        process has them all in `done` already."""
        if processes == 1:
            return done
        accelerator.wait_for_everyone()  # each one's earlier shards are written
        found = _read_shards(work / SHARDS)
        accelerator.wait_for_everyone()  # and read by all before anyone writes again
        return found

    done = in_step() if processes > 1 else _read_shards(work / SHARDS)
    tokenizer = _chat_tokenizer(target, model)
    kind = engine(generate, hardware, target)
    step = generate.batch_size if kind == "hf" else generate.concurrency
    opened = _in_process(target, model, hardware, tokenizer, generate, evaluation.seed,
                         accelerator.device if accelerator else "cuda") \
        if kind == "hf" else _served(target, kind, model, hardware, tokenizer, generate,
                                     evaluation.seed, work)
    # a resumed run adds shards, never replaces one
    numbered = len(list((work / SHARDS).glob(f"*-rank{rank}-*.jsonl")))
    with opened as answer:
        for turn in range(max(len(p.turns) for p in chosen)):
            done = in_step() if turn else done  # turn 2 follows every process's turn 1
            pending = [(p, sample) for p in chosen if turn < len(p.turns)
                       for sample in range(generate.num_samples)
                       if (p.id, turn, sample) not in done]
            for start in range(rank * step, len(pending), step * processes):
                batch = pending[start:start + step]
                answers = answer(turn, start, [(p, sample, _history(p, turn, sample, done,
                                                                     generate))
                                               for p, sample in batch])
                rundir.atomic_write_text(
                    work / SHARDS / f"{numbered:06d}-rank{rank}-turn{turn}.jsonl",
                    "".join(json.dumps(a) + "\n" for a in answers))
                numbered += 1
                done.update({(a["prompt_id"], a["turn"], a["sample"]): a for a in answers})
                log.info("eval %s: turn %d, %d/%d answers", target.label, turn + 1,
                         min(start + len(batch), len(pending)), len(pending))
    done = in_step()
    if rank != 0:
        return  # the main process writes the cell
    order = {p.id: index for index, p in enumerate(chosen)}
    rows = sorted((a for a in done.values() if a["prompt_id"] in order),
                  key=lambda a: (order[a["prompt_id"]], a["turn"], a["sample"]))
    with rundir.staged_directory(cell) as staging:
        (staging / GENERATIONS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        cells.write_record(staging, target, settings(evaluation, hardware, target),
                           metric_rows(rows, target, generate.prompts),
                           answered_per_process=_answered_per_process(work / SHARDS))
    shutil.rmtree(work, ignore_errors=True)


def _answered_per_process(shards: Path) -> dict[str, int]:
    """How many answers each process rank made, over every run that worked on the cell (a
    killed run's shards included): rank -> count."""
    counts: dict[str, int] = {}
    for shard in shards.glob("*-rank*-turn*.jsonl"):
        rank = shard.name.split("-rank")[1].split("-")[0]
        counts[rank] = counts.get(rank, 0) + len(shard.read_text().splitlines())
    return dict(sorted(counts.items()))


def _chat_tokenizer(target: Target, model: ModelConfig):
    tokenizer = models.load_tokenizer(target.path, model, target.revision)
    if not tokenizer.chat_template:
        raise UserError(problem(
            "model.chat_template_path", model.chat_template_path, f"{target.label}'s tokenizer "
            "has no chat template, so prompts cannot be put as chat turns", "a model with a "
            "chat template, or a Jinja template file", "model.chat_template_path=<template.jinja>"))
    return tokenizer


def refuse_without_chat_template(targets: list[Target], model: ModelConfig) -> None:
    """Before the evaluation workers start: a missing chat template is the user's one line
    here, not a worker's crash."""
    for target in targets:
        _chat_tokenizer(target, model)


def engine(generate: GenerateConfig, hardware: HardwareConfig, target: Target) -> str:
    """The engine that answers: as set, or for `auto` vLLM on a GPU profile where it is
    installed and the checkpoint is one vLLM serves (not a prompt-tuning adapter), else hf."""
    if generate.engine != "auto":
        return generate.engine
    if hardware.accelerator != "cuda" or not shutil.which("vllm"):
        return "hf"
    info = models.adapter_config(target.path) if Path(target.path).is_dir() else None
    return "hf" if info and models.adapter_kind(info) != "lora" else "vllm"


@contextmanager
def _in_process(target: Target, model: ModelConfig, hardware: HardwareConfig, tokenizer,
                generate: GenerateConfig, seed: int, device: Any = "cuda") -> Iterator[Any]:
    """engine=hf: the checkpoint loaded here, answering a batch per generate call."""
    tokenizer.padding_side = "left"
    held = {"model": models.load_trained(target.path, model, hardware, target.revision)}
    if hardware.accelerator == "cuda" and model.quantization == "none":
        held["model"].to(device)
    held["model"].eval()
    try:
        yield lambda turn, start, batch: _answer(held["model"], tokenizer, generate, seed, turn,
                                                 start, batch)
    finally:
        held.clear()  # the weights go before the next checkpoint loads
        gc.collect()


@contextmanager
def _served(target: Target, kind: str, model: ModelConfig, hardware: HardwareConfig, tokenizer,
            generate: GenerateConfig, seed: int, work: Path) -> Iterator[Any]:
    """A server engine: the checkpoint served (evaluation/server.py), asked through the openai
    client, `concurrency` requests at a time; its retries are the client's own."""
    server.end_left_behind(work)  # a run killed outright could not stop its server
    served = server.served_model(target, kind, model, hardware, work,  # type: ignore[arg-type]
                                 "eval.generate.engine=hf answers with it unmerged")
    try:
        with server.serving(served.launch, work / "server.log",
                            float(generate.server_startup_timeout_s),
                            generate.server_address) as running:
            client = server.client(running.base_url, generate.api_key_env,
                                   generate.max_retries, generate.request_timeout_s)
            with ThreadPoolExecutor(generate.concurrency) as pool:
                yield lambda turn, start, batch: _ask(client, pool, kind, served.name,
                                                      tokenizer, generate, seed, turn, batch)
    finally:
        if served.merged:
            shutil.rmtree(served.merged, ignore_errors=True)


def _ask(client, pool, kind: str, name: str, tokenizer, generate: GenerateConfig, seed: int,
         turn: int, batch: list[tuple[Prompt, int, list[dict[str, str]]]]
         ) -> list[dict[str, Any]]:
    """One request per prompt for the samples that share a history (turn 1 asks for `n`), and
    again for what a server returned too few of (transformers serve returns one choice)."""
    groups: dict[tuple[str, str], list[tuple[Prompt, int, list[dict[str, str]]]]] = {}
    for unit in batch:
        groups.setdefault((unit[0].id, json.dumps(unit[2])), []).append(unit)

    def complete(units):
        history, wanted, got = units[0][2], len(units), []
        while len(got) < wanted:
            answer = client.chat.completions.create(
                model=name, messages=history, max_tokens=generate.max_new_tokens,
                temperature=generate.temperature, top_p=generate.top_p, n=wanted - len(got),
                seed=seed * 1_000_003 + turn * 10_007 + units[0][1] + len(got),
                extra_body={**server.sampling_fields(kind, generate.temperature),
                            **generate.extra} or None)
            got += answer.choices[:wanted - len(got)]
        return [_served_answer(tokenizer, prompt, sample, turn, history, choice)
                for (prompt, sample, _), choice in zip(units, got)]

    return [row for rows in pool.map(complete, groups.values()) for row in rows]


def _served_answer(tokenizer, prompt: Prompt, sample: int, turn: int,
                   history: list[dict[str, str]], choice) -> dict[str, Any]:
    text = choice.message.content or ""
    ended = choice.finish_reason == "stop"
    if tokenizer.eos_token and text.endswith(tokenizer.eos_token):
        text, ended = text[:-len(tokenizer.eos_token)], True  # a server that leaves it in
    rendered = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    return {"prompt_id": prompt.id, "category": prompt.category, "turn": turn, "sample": sample,
            "question": prompt.turns[turn], "prompt": rendered, "answer": text,
            "finish_reason": "eos" if ended else "length",
            "prompt_tokens": len(tokenizer(rendered, add_special_tokens=False)["input_ids"]),
            "new_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])
            + (1 if ended else 0)}


def _read_shards(shards: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    done = {}
    for shard in sorted(shards.glob("*.jsonl")):
        for line in shard.read_text().splitlines():
            answer = json.loads(line)
            done[(answer["prompt_id"], answer["turn"], answer["sample"])] = answer
    return done


def _history(prompt: Prompt, turn: int, sample: int, done: dict,
             generate: GenerateConfig) -> list[dict[str, str]]:
    """The chat so far: the system prompt, each earlier turn with this sample's own answer."""
    messages = [{"role": "system", "content": generate.system_prompt}] \
        if generate.system_prompt else []
    for earlier in range(turn):
        messages += [{"role": "user", "content": prompt.turns[earlier]},
                     {"role": "assistant",
                      "content": done[(prompt.id, earlier, sample)]["answer"]}]
    return messages + [{"role": "user", "content": prompt.turns[turn]}]


def _answer(loaded, tokenizer, generate: GenerateConfig, seed: int, turn: int, start: int,
            batch: list[tuple[Prompt, int, list[dict[str, str]]]]) -> list[dict[str, Any]]:
    """One generate call for a batch of (prompt, sample, history), left-padded."""
    import torch

    texts = [tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
             for _, _, history in batch]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    encoded = {key: value.to(loaded.device) for key, value in encoded.items()}
    sampling = {"do_sample": True, "temperature": generate.temperature,
                "top_p": generate.top_p} if generate.temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed * 1_000_003 + turn * 10_007 + start)  # the same batch, the same draw
    with torch.no_grad():
        output = loaded.generate(**encoded, max_new_tokens=generate.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling,
                                 **generate.extra)
    stops = _eos_ids(loaded, tokenizer)
    width = encoded["input_ids"].shape[1]
    answers = []
    for row, ((prompt, sample, history), text) in enumerate(zip(batch, texts)):
        new = output[row, width:].tolist()
        end = next((i for i, token in enumerate(new) if token in stops), None)
        kept = new[:end] if end is not None else [t for t in new
                                                  if t != tokenizer.pad_token_id]
        answers.append({
            "prompt_id": prompt.id, "category": prompt.category, "turn": turn, "sample": sample,
            "question": prompt.turns[turn], "prompt": text, "answer": tokenizer.decode(kept, skip_special_tokens=True),
            "finish_reason": "eos" if end is not None else "length",
            "prompt_tokens": int(encoded["attention_mask"][row].sum()),
            "new_tokens": end + 1 if end is not None else len(kept)})
    return answers


def _eos_ids(loaded, tokenizer) -> set[int]:
    configured = loaded.generation_config.eos_token_id
    found = set(configured if isinstance(configured, list) else [configured])
    return {token for token in found | {tokenizer.eos_token_id} if token is not None}


# ---------------------------------------------------------------------------------------------
# Metrics


def repeats_at_end(text: str) -> bool:
    """The tail is a loop: one piece of 1-100 characters at least three times in a row at the
    very end (the earliest may lack the piece's leading spaces), the repeats covering at least
    12 characters."""
    text = text.rstrip()
    for period in range(1, 101):
        times = max(3, -(-12 // period))  # "!!!" is punctuation; 12 of them is a loop
        piece = text[-period:]
        if period * times > len(text) + (len(piece) - len(piece.lstrip())):
            break
        before = text[:len(text) - period * (times - 1)]
        if text.endswith(piece * (times - 1)) and before.endswith(piece.lstrip()) \
                and piece.strip():
            return True
    return False


def distinct_2(answers: list[str]) -> float | None:
    bigrams = [pair for answer in answers for pair in zip(answer.split(), answer.split()[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else None


def metric_rows(rows: list[dict[str, Any]], target: Target, prompt_set: str) -> list[dict]:
    task = prompt_set if prompt_set in prompts.NAMED else Path(prompt_set).stem
    if not rows:
        return []
    values = {
        "eos_rate": sum(r["finish_reason"] == "eos" for r in rows) / len(rows),
        "repetition": sum(repeats_at_end(r["answer"]) for r in rows) / len(rows),
        "mean_new_tokens": sum(r["new_tokens"] for r in rows) / len(rows),
        "distinct_2": distinct_2([r["answer"] for r in rows]),
    }
    return [{"checkpoint": target.label, "step": target.step, "backend": "generate",
             "task": task, "group": None, "metric": metric, "num_fewshot": None,
             "eval_mode": "none", "value": value, "stderr": None}
            for metric, value in values.items() if value is not None]


# ---------------------------------------------------------------------------------------------
# Reading the answers


def write_samples(run_dir: Path) -> Path | None:
    """samples.md in the run directory (rewritten from the cells, like metrics.csv)."""
    return write_samples_of({"": Path(run_dir)}, Path(run_dir) / SAMPLES_MD)


def write_samples_of(runs: dict[str, Path], path: Path) -> Path | None:
    """samples.md: each prompt with every checkpoint's first answer (sample 0), turn by turn,
    per generation setting. runs: what tells a sweep's jobs apart ("" for one run) -> its run
    directory; jobs sharing a run directory show its cells once."""
    found, seen = [], set()
    for prefix, run_dir in runs.items():
        for record in sorted((Path(run_dir) / "eval").glob(f"*/generate-*/{cells.CELL_RECORD}")):
            if record.resolve() not in seen:
                seen.add(record.resolve())
                found.append((prefix, record))
    if not found:
        return None
    by_setting: dict[str, dict[str, list[dict[str, Any]]]] = {}
    order: dict[str, tuple] = {}
    for prefix, record in found:
        cell = json.loads(record.read_text())
        label = f"{prefix} {cell['checkpoint']}".strip()
        order[label] = (prefix, cells.checkpoint_order(cell["checkpoint"]))
        answers = [json.loads(line) for line in
                   (record.parent / GENERATIONS).read_text().splitlines() if line.strip()]
        by_setting.setdefault(cell["settings_hash"], {})[label] = [
            a for a in answers if a["sample"] == 0]
    lines = ["# Samples", "", "Each prompt with every checkpoint's first answer (sample 0).", ""]
    for setting, checkpoints in by_setting.items():
        labels = sorted(checkpoints, key=order.__getitem__)
        lines += [f"## Generation settings {setting}", ""]
        first = checkpoints[labels[0]]
        for answer in [a for a in first if a["turn"] == 0]:
            category = f" ({answer['category']})" if answer.get("category") else ""
            lines += [f"### Prompt {answer['prompt_id']}{category}", ""]
            turns = sorted({a["turn"] for a in first if a["prompt_id"] == answer["prompt_id"]})
            for turn in turns:
                question = next(a.get("question", "") for a in first if a["prompt_id"] ==
                                answer["prompt_id"] and a["turn"] == turn)
                lines += [f"**Turn {turn + 1}**: {_readable(question)}", ""]
                for label in labels:
                    mine = next((a for a in checkpoints[label] if a["prompt_id"] ==
                                 answer["prompt_id"] and a["turn"] == turn), None)
                    if mine is None:
                        continue
                    shown = _readable(mine["answer"]) or "(empty)"
                    lines.append(f"- **{label}** ({mine['finish_reason']}, {mine['new_tokens']} "
                                 f"tokens): {shown}")
                lines.append("")
    rundir.atomic_write_text(path, "\n".join(lines))
    return path


def _readable(text: str) -> str:
    """One line, control characters (an untrained model's bytes) shown as U+FFFD."""
    return "".join(c if c.isprintable() else "\ufffd" for c in " ".join(text.split()))
