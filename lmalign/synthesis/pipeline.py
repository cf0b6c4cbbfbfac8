"""stage=synthesize: instructions -> filter -> responses -> filter -> scores -> sft/ and
preferences/, with synth.md counting what every step kept.

Every generation step works in fixed batches of `synth.batch_size` items over a fixed item order,
each written as an atomic shard (`synth/<step>/<batch>.jsonl`) once its batch is done, so a
re-run, or a run killed at any point, makes only the missing batches: the same item ids, each
exactly once, and (sampling seeded per batch) the same texts. Each batch has a deadline
(transformers' `max_time`): one that misses it is retried once at half the size, then the stage
stops with an error naming the step, batch and settings, its finished shards kept.

Over 60 lines in `synthesize` on purpose: it is the stage read top to bottom, step by step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from lmalign import data, models, rundir, scoring
from lmalign.errors import UserError, problem
from lmalign.schema import Config, ModelConfig, SynthConfig
from lmalign.synthesis import card, engines, filters, magpie

log = logging.getLogger(__name__)
SYNTH_DIR = "synth"
SETTINGS = "settings.json"
# Settings that change no text or score: a re-run may change them.
_FREE = ("batch_timeout_s", "reward_batch_size", "name", "concurrency", "api_key_env",
         "server_startup_timeout_s")
_FREE_JUDGE = ("base_url", "api_key_env", "server_startup_timeout_s", "concurrency",
               "max_retries", "request_timeout_s", "baseline", "bootstrap_samples")
_SCORING = ("scorer", "judge", "reward_model", "reward_input", "reward_max_length")
SCORES = "scores.jsonl"


def synthesize(config: Config, run_dir: Path) -> dict[str, Any]:
    synth = config.synth
    work = run_dir / SYNTH_DIR
    _refuse_changed(synth, work)
    generator = source(synth.generator, "synth.generator", config.runs_root)
    reward_path = source(synth.reward_model, "synth.reward_model", config.runs_root) \
        if synth.scorer == "reward_model" else None
    counts: dict[str, Any] = {}
    loading = _loading(config.model)

    tokenizer = models.load_start_tokenizer(generator, loading)
    prompt = magpie.pre_query(tokenizer.chat_template, tokenizer.bos_token or "",
                              tokenizer.eos_token or "", synth.pre_query_template)
    log.info("pre-query text %r; a user turn ends at %r", prompt.text, prompt.end_of_turn)

    with engines.sampler(synth, generator, loading, config.hardware, tokenizer, work) as engine:
        ids = [f"i{index:06d}" for index in range(synth.num_instructions)]
        made = _batches("instructions", work, ids, synth, lambda batch, size, seed: engine.complete(
            [prompt.text] * size, synth.instruction_temperature, synth.instruction_top_p,
            synth.instruction_max_new_tokens, prompt.end_of_turn, seed, synth.batch_timeout_s),
            lambda item, out: {"id": item, "instruction": out[0].strip(),
                               "finish_reason": out[1]})
        counts["instructions generated"] = len(made)
        kept, dropped = filters.instructions(made, synth.filters, _benchmarks(synth))
        counts["instructions dropped"] = dict(dropped)
        counts["instructions kept"] = len(kept)

        by_id = {item["id"]: item for item in kept}
        answers: list[dict[str, Any]] = []
        for t_index, temperature in enumerate(synth.temperatures):
            samples = [k for k in range(synth.responses_per_instruction)
                       if k % len(synth.temperatures) == t_index]
            items = [f"{item['id']}-r{k}" for item in kept for k in samples]
            answers += _batches(
                f"responses-t{t_index}", work, items, synth,
                lambda batch, size, seed, temperature=temperature: engine.chat(
                    [by_id[i.split('-')[0]]["instruction"] for i in batch], temperature,
                    synth.response_top_p, synth.response_max_new_tokens, seed,
                    synth.batch_timeout_s),
                lambda item, out, temperature=temperature: {
                    "id": item, "instruction_id": item.split("-")[0],
                    "temperature": temperature, "response": out[0].strip(),
                    "finish_reason": out[1]})
        counts["responses generated"] = len(answers)
        answers, dropped = filters.responses(answers, synth.filters)
        counts["responses dropped"] = dict(dropped)
        counts["responses kept"] = len(answers)
    # the generator's memory (or its server) is gone before the reward model loads

    scores = _scores(answers, by_id, reward_path, config, loading, run_dir)
    for answer in answers:
        answer["score"] = scores[answer["id"]]
    ungraded = [a for a in answers if a["score"] is None]
    if ungraded:  # only a judge leaves answers without a score: its reasons are in the log
        counts["responses ungraded"] = {"judge gave no valid grade": len(ungraded)}
        answers = [a for a in answers if a["score"] is not None]
        counts["responses scored"] = len(answers)
    sft, preferences, pair_counts = _datasets(answers, by_id, synth)
    counts.update(pair_counts)
    card.write(run_dir / "synth.md", synth, counts, sft, preferences, answers,
               generator.label, reward_path)
    if not sft:
        raise UserError(problem(
            "synth.filters", _plain(synth)["filters"], "no instruction and answer survived "
            f"the filters (the counts are in {run_dir / 'synth.md'})", "filters that keep "
            "some of what the generator writes", "loosen synth.filters under a new run_name, "
            "or check the generator's pre-query text (synth.pre_query_template) in the log"))
    _write_dataset(run_dir / data.SYNTHESIZED_PARTS["messages"], sft)
    _write_dataset(run_dir / data.SYNTHESIZED_PARTS["preference"], preferences)
    log.info("synthesized %d SFT rows (sft/) and %d preference pairs (preferences/); "
             "counts in %s", len(sft), len(preferences), run_dir / "synth.md")
    return counts


def _benchmarks(synth: SynthConfig) -> filters.Benchmarks | None:
    """The evaluation prompts of synth.filters.decontaminate, every user turn of each."""
    from lmalign.evaluation import prompts

    if not synth.filters.decontaminate:
        return None
    sets = {}
    for name in synth.filters.decontaminate:
        try:
            sets[name] = [turn for prompt in prompts.named_or_file(name) for turn in prompt.turns]
        except UserError as exc:
            raise UserError(problem("synth.filters.decontaminate", name, "cannot be read as "
                                    f"prompts: {'; '.join(exc.problems)}", "a named set "
                                    f"({', '.join(prompts.NAMED)}) or a prompts file with a "
                                    "prompt or turns column", "fix the file or drop it from "
                                    "the list")) from None
    found = filters.Benchmarks.of(sets, synth.filters.decontamination_ngram,
                                  synth.filters.decontamination_min_overlap)
    log.info("decontaminating against %d evaluation prompts (%s)", len(found.prompts),
             ", ".join(f"{name}: {len(texts)}" for name, texts in sets.items()))
    return found


def _loading(model: ModelConfig) -> ModelConfig:
    """How the generator and reward model load: in the hardware profile's precision and
    attention, with their own tokenizers' templates (model= names what a run trains, not them)."""
    return dataclasses.replace(model, dtype="auto", attn_implementation=None,
                               quantization="none", chat_template_path=None, eos_token=None)


def source(name: str | None, key: str, runs_root: str) -> models.Start:
    """A run of ours (its final/), a directory, or a hub id: model.init_from's reading."""
    if not name:
        raise UserError(problem(key, None, "stage=synthesize needs it", "a run name, a model "
                                "directory or a hub id", f"{key}=<one of them>"))
    found = models.trained_start(name, runs_root)
    return found if found is not None else models.Start(name, None, tokenizer=name)


def _refuse_changed(synth: SynthConfig, work: Path) -> None:
    """A run directory holds one synthesis: its shards are only valid for the same settings, its
    scores for the same scorer (which may change until something is scored, e.g. to fix a
    judge that graded nothing)."""
    now = _compared(synth)
    saved_file = work / SETTINGS
    if saved_file.exists():
        before = json.loads(saved_file.read_text())
        flat_before, flat_now = _flat(before), _flat(now)
        changed = sorted(k for k in set(flat_before) | set(flat_now)
                         if flat_before.get(k) != flat_now.get(k))
        if not (work / SCORES).exists():
            changed = [k for k in changed if k.split(".")[0] not in _SCORING]
        if changed:
            raise UserError([problem(f"synth.{k}", flat_now.get(k), "this run directory's "
                                     f"synthesis was made with synth.{k}={flat_before.get(k)!r}",
                                     "the same synthesis settings when re-running a run_name",
                                     "use a new run_name") for k in changed])
        if before == now:
            return
    work.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_json(saved_file, now)


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """synth.judge's keys as judge.<key>, so a refusal names the one that changed."""
    flat = {key: value for key, value in settings.items() if key != "judge"}
    flat.update({f"judge.{key}": value for key, value in settings.get("judge", {}).items()})
    return flat


def _compared(synth: SynthConfig) -> dict[str, Any]:
    """The settings a re-run must repeat: what changes a text or a score, for the scorer used."""
    found = {k: v for k, v in _plain(synth).items() if k not in _FREE}
    if synth.scorer == "judge":
        found["judge"] = {k: v for k, v in found["judge"].items() if k not in _FREE_JUDGE}
        for key in ("reward_model", "reward_input", "reward_max_length"):
            found.pop(key)
    else:
        found.pop("judge")
    return found


def _plain(synth: SynthConfig) -> dict[str, Any]:
    from pydantic import TypeAdapter

    return TypeAdapter(SynthConfig).dump_python(synth, mode="json")


def _batches(step: str, work: Path, items: list[str], synth: SynthConfig, make, record
             ) -> list[dict[str, Any]]:
    """Every item's record, in item order: finished shards read, the missing batches made."""
    from tqdm.auto import tqdm

    shards = work / step
    shards.mkdir(parents=True, exist_ok=True)
    for stale in shards.glob(".*"):  # a shard being written when a run was killed
        stale.unlink()
    found: list[dict[str, Any]] = []
    size = synth.batch_size
    starts = range(0, len(items), size)
    done = {start for start in starts if (shards / f"{start:06d}.jsonl").exists()}
    with tqdm(total=len(items), desc=step, unit="item", initial=sum(
            min(size, len(items) - s) for s in done)) as bar:
        for start in starts:
            shard = shards / f"{start:06d}.jsonl"
            batch = items[start:start + size]
            if start not in done:
                seed = zlib.crc32(f"{synth.seed}/{step}/{start}".encode())
                outputs = _with_deadline(step, start, batch, make, seed, synth)
                rundir.atomic_write_text(shard, "".join(
                    json.dumps(record(item, out)) + "\n" for item, out in zip(batch, outputs)))
                bar.update(len(batch))
            found += [json.loads(line) for line in shard.read_text().splitlines()]
    return found


def _with_deadline(step: str, start: int, batch: list[str], make, seed: int,
                   synth: SynthConfig) -> list[tuple[str, str]]:
    made = make(batch, len(batch), seed)
    if made is not None:
        return made
    half = max(1, len(batch) // 2)
    log.warning("%s: batch %d (%d items) missed its %g s deadline; retrying at %d", step,
                start, len(batch), synth.batch_timeout_s, half)
    outputs: list[tuple[str, str]] = []
    for offset in range(0, len(batch), half):
        part = make(batch[offset:offset + half], len(batch[offset:offset + half]), seed + offset)
        if part is None:
            raise UserError(problem(
                "synth.batch_timeout_s", synth.batch_timeout_s, f"step {step}, batch {start} "
                f"(items {batch[0]}..{batch[-1]}): {len(batch)} sequences, then {half}, did not "
                f"finish within the deadline (batch_size {synth.batch_size}, up to "
                f"{synth.instruction_max_new_tokens if step == 'instructions' else synth.response_max_new_tokens}"
                " new tokens)", "a deadline the generator meets", "a larger "
                "synth.batch_timeout_s or a smaller synth.batch_size; the finished batches are "
                "kept, and the same command resumes after them"))
        outputs += part
    return outputs


def _scores(answers: list[dict[str, Any]], by_id: dict[str, dict[str, Any]], reward_path,
            config: Config, loading: ModelConfig, run_dir: Path) -> dict[str, float | None]:
    """Each kept answer's score (None: the judge gave none), cached in synth/scores.jsonl
    (written once, whole)."""
    cached = run_dir / SYNTH_DIR / SCORES
    if not answers:
        return {}
    if cached.exists():
        known = {r["id"]: r["score"] for r in map(json.loads, cached.read_text().splitlines())}
        if all(a["id"] in known for a in answers):
            return known
    found = _judged(answers, by_id, config, run_dir) if config.synth.scorer == "judge" \
        else _rewarded(answers, by_id, reward_path, config, loading)
    rundir.atomic_write_text(cached, "".join(json.dumps({"id": k, "score": v}) + "\n"
                                             for k, v in found.items()))
    return found


def _judged(answers: list[dict[str, Any]], by_id: dict[str, dict[str, Any]], config: Config,
            run_dir: Path) -> dict[str, float | None]:
    from lmalign.evaluation import judge, server

    synth = config.synth
    log.info("grading %d responses with the judge %s (%s rubric)", len(answers),
             synth.judge.model, synth.judge.rubric)
    grades = judge.grade_answers(
        synth.judge, [(by_id[a["instruction_id"]]["instruction"], a["response"]) for a in answers],
        Path(config.cache.build_dir).expanduser() / judge.CACHE_SUBDIR,
        run_dir / SYNTH_DIR / server.JUDGE_SERVER_DIR, config.hardware)
    reasons = Counter(reason for _, reason in grades if reason)
    summary = "; ".join(f"{n}x {reason}" for reason, n in reasons.most_common(3))
    if grades and sum(reasons.values()) == len(grades):
        raise UserError(problem(
            "synth.judge.model", synth.judge.model, f"the judge graded none of {len(grades)} "
            f"responses ({summary})", f"a judge that answers in the {synth.judge.rubric} "
            "rubric's format", "fix synth.judge (model, base_url, rubric); the same command "
            "then asks again, the generations kept"))
    if reasons:
        log.warning("the judge gave no valid grade to %d of %d responses (%s); they are "
                    "dropped (the data card counts them)",
                    sum(reasons.values()), len(grades), summary)
    return {a["id"]: grade for a, (grade, _) in zip(answers, grades)}


def _rewarded(answers: list[dict[str, Any]], by_id: dict[str, dict[str, Any]], reward_path,
              config: Config, loading: ModelConfig) -> dict[str, float | None]:
    synth = config.synth
    path = str(reward_path.adapter or reward_path.path)
    tokenizer = models.load_tokenizer(path, loading, reward_path.revision)
    loaded = models.load_trained(path, loading, config.hardware, reward_path.revision,
                                 head="reward")
    if config.hardware.accelerator == "cuda":
        loaded.to("cuda")
    style = scoring.input_style(tokenizer) if synth.reward_input == "auto" else synth.reward_input
    log.info("scoring %d responses with %s as %s", len(answers), path,
             "chats (its chat template)" if style == "chat" else "(question, answer) pairs")
    items: list[scoring.Scored] = [
        [{"role": "user", "content": by_id[a["instruction_id"]]["instruction"]},
         {"role": "assistant", "content": a["response"]}] if style == "chat" else
        (by_id[a["instruction_id"]]["instruction"], a["response"]) for a in answers]
    values = scoring.score(loaded, tokenizer, items, synth.reward_batch_size,
                           synth.reward_max_length, "scoring responses")
    return {a["id"]: v for a, v in zip(answers, values)}


def _datasets(answers: list[dict[str, Any]], by_id: dict[str, dict[str, Any]],
              synth: SynthConfig) -> tuple[list[dict], list[dict], dict[str, int]]:
    """sft rows (each instruction's best answer, the best-scored share of instructions) and
    preference pairs (best against worst, margin at least min_margin, different texts)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for answer in answers:
        grouped.setdefault(answer["instruction_id"], []).append(answer)
    counts: Counter = Counter()
    ranked = []
    pairs = []
    for instruction_id in sorted(grouped):
        group = sorted(grouped[instruction_id], key=lambda a: (-a["score"], a["id"]))
        best, worst = group[0], group[-1]
        question = [{"role": "user", "content": by_id[instruction_id]["instruction"]}]
        ranked.append((best["score"], {"messages": question + [
            {"role": "assistant", "content": best["response"]}], "id": instruction_id,
            "score": best["score"]}))
        if len(group) < 2:
            counts["pairs skipped: one answer left"] += 1
        elif best["response"].strip() == worst["response"].strip():
            counts["pairs skipped: best and worst answers identical"] += 1
        elif best["score"] - worst["score"] < synth.min_margin:
            counts["pairs skipped: margin below min_margin"] += 1
        else:
            pairs.append({"prompt": question,
                          "chosen": [{"role": "assistant", "content": best["response"]}],
                          "rejected": [{"role": "assistant", "content": worst["response"]}],
                          "id": instruction_id, "chosen_score": best["score"],
                          "rejected_score": worst["score"]})
    ranked.sort(key=lambda pair: -pair[0])
    sft = [row for _, row in ranked[:max(1, round(len(ranked) * synth.sft_top_fraction))]] \
        if ranked else []
    counts["sft rows"] = len(sft)
    counts["preference pairs"] = len(pairs)
    return sorted(sft, key=lambda r: r["id"]), pairs, dict(counts)


def _write_dataset(target: Path, rows: list[dict[str, Any]]) -> None:
    """A datasets directory (dataset=local dataset.path=<it>) with the same rows as data.jsonl."""
    from datasets import Dataset

    with rundir.staged_directory(target) as staging:
        Dataset.from_list(rows).save_to_disk(str(staging))
        rundir.atomic_write_text(staging / "data.jsonl",
                                 "".join(json.dumps(r) + "\n" for r in rows))
