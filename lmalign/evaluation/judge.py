"""eval=judge: an LLM judge over eval=generate's answers, one cell per checkpoint
(docs/design.md, Evaluation backends).

Every answer of the checkpoint's generation cell (each prompt, turn and sample) is judged under
the rubric (rubrics.py); pairwise rubrics judge it against the baseline checkpoint's answer to
the same prompt, turn and sample, in both orders. Requests go through the openai client,
`concurrency` at a time; its own `max_retries` retries 429 (honouring Retry-After), 5xx and
timeouts. A reply the rubric cannot read, or a request that still fails after the retries, is a
judgment recorded invalid with its reason, never a crash; `invalid` counts them.

Each reply is cached under `<cache.build_dir>/judgments/<sha256>.json` (one atomic file per key;
the key covers the judge model, the request's parameters and every message, so the rubric,
question, reference, answer, order and the baseline's answer), so a re-run, a sweep or a
parallel SLURM job never asks twice, and a run killed while judging resumes from what it got.
A request that got no reply, or a reply the rubric cannot read, is not cached: once the judge is
fixed, removing the cell asks those again. The API key is read from
the variable `api_key_env` names and is written nowhere.

Metrics keep their own units: `score` on the rubric's scale (MT-Bench 1-10), per turn and per
category; `win_rate` / `tie_rate` / `loss_rate` as fractions; each criterion's mean on its
scale; `invalid` a count. Each mean has a bootstrap 95% interval (ci_low, ci_high) over the
cell's judgments.

A little over 400 lines: checks, requests with their cache, verdicts and metrics are one path
that reads top to bottom; the rubrics' texts and readings live apart in rubrics.py.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmalign import models, rundir
from lmalign.errors import UserError, problem
from lmalign.evaluation import cells, generate, prompts, rubrics, server
from lmalign.evaluation.cells import Target
from lmalign.evaluation.prompts import Prompt
from lmalign.evaluation.rubrics import Rubric
from lmalign.evaluation.targets import saved_targets
from lmalign.schema import EvalConfig, HardwareConfig, JudgeEvalConfig

log = logging.getLogger(__name__)
JUDGMENTS = "judgments.jsonl"
CACHE_SUBDIR = "judgments"


def settings(evaluation: EvalConfig, hardware: HardwareConfig, target: Target,
             rubric: Rubric | None = None) -> dict[str, Any]:
    """What changes the judgments: the answers judged (their generation cell's identity), the
    rubric's content, the judge model and its request parameters. Not the endpoint's address,
    key, concurrency or timeouts."""
    judge = evaluation.judge
    rubric = rubric or rubrics.load(judge.rubric)
    found = {"backend": "judge",
             "generation": cells.settings_hash(generate.settings(evaluation, hardware, target)),
             "rubric": judge.rubric, "rubric_sha256": rubric.sha256, "model": judge.model,
             "temperature": judge.temperature, "max_tokens": judge.max_tokens,
             "structured_output": judge.structured_output, "extra": dict(judge.extra)}
    if rubric.kind == "pairwise":
        found["baseline"] = judge.baseline
    return found


def judged_targets(targets: list[Target], evaluation: EvalConfig,
                   rubric: Rubric | None = None) -> list[Target]:
    """A pairwise rubric compares every target but the baseline itself with the baseline."""
    if (rubric or rubrics.load(evaluation.judge.rubric)).kind != "pairwise":
        return targets
    return [t for t in targets if t.label != evaluation.judge.baseline]


def requested_cells(targets: list[Target], evaluation: EvalConfig, hardware: HardwareConfig,
                    run_dir: Path) -> list[Path]:
    rubric = rubrics.load(evaluation.judge.rubric)
    return [cells.cell_dir(run_dir, target, settings(evaluation, hardware, target, rubric))
            for target in judged_targets(targets, evaluation, rubric)]


def check(judge: JudgeEvalConfig, key: str = "eval.judge") -> list[str]:
    """Before anything trains or loads: the rubric reads, the key's variable is set, and the
    judge's endpoint answers (a wrong address would otherwise make every judgment invalid).
    `key`: where the block sits (eval.judge, or synth.judge for synth.scorer=judge)."""
    problems = []
    try:
        rubrics.load(judge.rubric, f"{key}.rubric")
    except UserError as exc:
        problems += exc.problems
    if judge.server:
        return problems  # served by lmalign when its turn comes
    if judge.api_key_env and not os.environ.get(judge.api_key_env):
        problems.append(problem(
            f"{key}.api_key_env", judge.api_key_env, f"the judge's API key variable "
            f"{judge.api_key_env} is not set", "the NAME of a set variable holding the key, or "
            "null for an endpoint without keys", f"export {judge.api_key_env}=..., or "
            f"+secrets.{judge.api_key_env}=..., or {key}.api_key_env=null"))
    elif judge.base_url and judge.model:
        problems += _unreachable(judge, key)
    return problems


def _unreachable(judge: JudgeEvalConfig, key: str) -> list[str]:
    import openai

    client = _client(judge, judge.base_url, max_retries=0, timeout=15)
    try:
        client.models.list()
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        return [problem(f"{key}.base_url", judge.base_url, f"the judge does not answer "
                        f"there ({type(exc).__name__})", "the OpenAI-compatible base URL of a "
                        "running judge (.../v1)", "start the judge's server, or fix "
                        f"{key}.base_url")]
    except openai.AuthenticationError:
        return [problem(f"{key}.api_key_env", judge.api_key_env, "the judge's endpoint "
                        "rejected the key in that variable (401)", "a valid key",
                        f"export a valid key as {judge.api_key_env}")]
    except openai.APIError:
        pass  # an endpoint without /models still judges
    return []


def _client(judge: JudgeEvalConfig, base_url: str, max_retries: int | None = None,
            timeout: float | None = None):
    """A judge lmalign serves itself takes no key."""
    return server.client(base_url, None if judge.server else judge.api_key_env,
                         judge.max_retries if max_retries is None else max_retries,
                         timeout or judge.request_timeout_s)


# ---------------------------------------------------------------------------------------------
# Judging


@dataclass
class Ask:
    """One judge request: which answer it judges, and the messages sent."""

    prompt_id: str
    category: str | None
    turn: int
    sample: int
    order: str | None  # pairwise: "AB" (this checkpoint is A) or "BA"
    messages: list[dict[str, str]]
    reply: dict[str, Any] = field(default_factory=dict)  # text, usage, cached, error


def evaluate(targets: list[Target], evaluation: EvalConfig, run_dir: Path,
             hardware: HardwareConfig, build_dir: str, runs_root: str) -> None:
    """Every missing judge cell of these targets, after their generation cells exist."""
    judge = evaluation.judge
    rubric = rubrics.load(judge.rubric)
    by_id = {p.id: p for p in prompts.load(evaluation.generate)}
    baseline = _read_generations(_baseline_cell(targets, evaluation, run_dir, hardware,
                                                 runs_root)) \
        if rubric.kind == "pairwise" else None
    cache = Path(build_dir).expanduser() / CACHE_SUBDIR
    judged = judged_targets(targets, evaluation, rubric)
    if not judged:
        log.warning("eval.judge: only the baseline %s was evaluated, so nothing is compared "
                    "with it; add the checkpoints to compare (eval.checkpoints=[%s,final])",
                    judge.baseline, judge.baseline)
    pending = []
    for target in judged:
        cell = cells.cell_dir(run_dir, target, settings(evaluation, hardware, target, rubric))
        if cells.is_complete(cell):
            log.info("eval %s: judge cell done, skipping", target.label)
        else:
            pending.append((target, cell))
    if not pending:
        return
    with server.judge_endpoint(judge, Path(run_dir) / server.JUDGE_SERVER_DIR,
                               hardware) as base_url:
        for target, cell in pending:
            asks = _asks(rubric, by_id, _answers(run_dir, target, evaluation, hardware),
                         baseline)
            log.info("eval %s: %d judgment(s) by %s (%s rubric) -> %s", target.label,
                     len(asks), judge.model, judge.rubric, cell.relative_to(run_dir))
            _ask_all(asks, judge, rubric, cache, f"eval {target.label}", base_url)
            _write_cell(target, cell, asks, rubric, evaluation, hardware, list(by_id))


def _write_cell(target: Target, cell: Path, asks: list[Ask], rubric: Rubric,
                evaluation: EvalConfig, hardware: HardwareConfig, order: list[str]) -> None:
    """judgments.jsonl and cell.json, at once; then what the run should know about them."""
    judge = evaluation.judge
    judgments = _judgments(rubric, asks, {p: index for index, p in enumerate(order)})
    rows = metric_rows(rubric, judgments, target, evaluation)
    usage = {"requests": sum(not a.reply.get("cached") for a in asks),
             "cached": sum(bool(a.reply.get("cached")) for a in asks),
             "prompt_tokens": sum(a.reply.get("usage", {}).get("prompt_tokens") or 0
                                  for a in asks if not a.reply.get("cached")),
             "completion_tokens": sum(a.reply.get("usage", {}).get("completion_tokens") or 0
                                      for a in asks if not a.reply.get("cached"))}
    with rundir.staged_directory(cell) as staging:
        (staging / JUDGMENTS).write_text("".join(json.dumps(j) + "\n" for j in judgments))
        cells.write_record(staging, target, settings(evaluation, hardware, target, rubric),
                           rows, usage=usage)
    invalid = sum(not j["valid"] for j in judgments)
    log.info("eval %s: %d judgment(s), %d invalid; %d request(s) made, %d from the cache, "
             "%d + %d tokens", target.label, len(judgments), invalid, usage["requests"],
             usage["cached"], usage["prompt_tokens"], usage["completion_tokens"])
    unanswered = sum(bool(a.reply.get("error")) for a in asks)
    if unanswered:
        log.warning("eval %s: %d judge request(s) got no reply after %d retries (see "
                    "reason in %s)", target.label, unanswered, judge.max_retries, JUDGMENTS)
    if invalid:
        log.warning("eval %s: %d invalid judgment(s) are not cached: remove %s to ask the "
                    "judge again", target.label, invalid, cell)
    if judgments and invalid == len(judgments):
        reasons = sorted({j["reason"] for j in judgments})
        log.warning("eval %s: every judgment is invalid (%s): is %s a judge that follows "
                    "the %s rubric's format?", target.label, "; ".join(reasons[:3]),
                    judge.model, judge.rubric)


def _answers(run_dir: Path, target: Target, evaluation: EvalConfig,
             hardware: HardwareConfig) -> dict[tuple[str, int, int], str]:
    cell = cells.cell_dir(run_dir, target, generate.settings(evaluation, hardware, target))
    return _read_generations(cell)


def _read_generations(cell: Path) -> dict[tuple[str, int, int], str]:
    rows = [json.loads(line) for line in (cell / generate.GENERATIONS).read_text().splitlines()
            if line.strip()]
    return {(r["prompt_id"], r["turn"], r["sample"]): r["answer"] for r in rows}


def baseline_problems(targets: list[Target], evaluation: EvalConfig, run_dir: Path,
                      hardware: HardwareConfig, runs_root: str) -> list[str]:
    """Before anything loads: a pairwise baseline is evaluated in this command, or has answers
    in this run or (`<run>/<checkpoint>`) in another one already."""
    if rubrics.load(evaluation.judge.rubric).kind != "pairwise":
        return []
    try:
        _baseline_cell(targets, evaluation, run_dir, hardware, runs_root)
    except UserError as exc:
        return exc.problems
    return []


def in_another_run(baseline: str) -> bool:
    """eval.judge.baseline=<run name or directory>/<checkpoint>: another run's answers."""
    return "/" in baseline


def _baseline_cell(targets: list[Target], evaluation: EvalConfig, run_dir: Path,
                   hardware: HardwareConfig, runs_root: str) -> Path:
    """The baseline checkpoint's generation cell under the same generation settings: evaluated
    in this job, earlier in this run, or in another run."""
    baseline = evaluation.judge.baseline
    match = [t for t in targets if t.label == baseline]
    if match:
        return cells.cell_dir(run_dir, match[0],
                              generate.settings(evaluation, hardware, match[0]))
    where, label = Path(run_dir), baseline
    if in_another_run(baseline):
        run, label = baseline.rsplit("/", 1)
        looked = models.run_candidates(run, runs_root)  # as model.init_from finds a run
        where = next((c for c in looked if (c / rundir.RUN_RECORD).exists()), looked[-1])
        if not (where / rundir.RUN_RECORD).exists():
            raise UserError(problem(
                "eval.judge.baseline", baseline, f"no run {run} (looked in "
                f"{' and '.join(map(str, looked))})", "<run name or directory>/<checkpoint>",
                "the name of a run under runs_root, or its directory"))
    # base, the saved checkpoints, and whatever was evaluated there (hub revisions too)
    known = list(dict.fromkeys(["base"] + [t.label for t in saved_targets(where)] + sorted(
        p.name for p in (where / "eval").glob("*") if p.is_dir())))
    if label not in known:
        prefix, closest = baseline[:-len(label)], difflib.get_close_matches(label, known, 1)
        raise UserError(problem(
            "eval.judge.baseline", baseline, f"{label} is not a checkpoint of {where}",
            ", ".join(prefix + k for k in known),
            f"eval.judge.baseline={prefix}{(closest or known)[0]}"))
    wanted = generate.settings(evaluation, hardware, Target(label, None, str(where)))
    wanted.pop("engine")  # the baseline may have answered through another engine
    for record in sorted((where / "eval" / label).glob(f"generate-*/{cells.CELL_RECORD}")):
        found = json.loads(record.read_text())["settings"]
        found.pop("engine", None)
        if found == wanted:
            return record.parent
    fix = f"generate them first: python -m lmalign stage=eval run_name={where.name} " \
          f"'eval=[generate]' eval.checkpoints=[{label}] with these eval.generate settings" \
        if in_another_run(baseline) else f"add it to the checkpoints: " \
        f"eval.checkpoints=[{label},final]"
    raise UserError(problem(
        "eval.judge.baseline", baseline, f"no answers of {label} with these generation "
        f"settings in {where} to compare with", "a checkpoint evaluated in the same command, "
        "one generated earlier with the same eval.generate settings, or <run>/<checkpoint> "
        "of another run", fix))


def _asks(rubric: Rubric, by_id: dict[str, Prompt], answers: dict[tuple[str, int, int], str],
          baseline: dict[tuple[str, int, int], str] | None) -> list[Ask]:
    asks = []
    for (prompt_id, turn, sample) in answers:
        prompt = by_id.get(prompt_id)
        if prompt is None:
            continue
        mine = [answers[(prompt_id, t, sample)] for t in range(turn + 1)]
        if rubric.kind == "single":
            asks.append(Ask(prompt_id, prompt.category, turn, sample, None,
                            rubrics.single_messages(rubric, prompt, turn, mine)))
        elif rubric.kind == "criteria":
            asks.append(Ask(prompt_id, prompt.category, turn, sample, None,
                            rubrics.criteria_messages(rubric, prompt, turn, mine)))
        else:
            theirs = [_baseline_answer(baseline or {}, prompt_id, t, sample)
                      for t in range(turn + 1)]
            if any(answer is None for answer in theirs):
                continue
            asks += [Ask(prompt_id, prompt.category, turn, sample, "AB",
                         rubrics.pairwise_messages(rubric, prompt, turn, mine, theirs)),
                     Ask(prompt_id, prompt.category, turn, sample, "BA",
                         rubrics.pairwise_messages(rubric, prompt, turn, theirs, mine))]
    return asks


def grade_answers(judge: JudgeEvalConfig, questions_and_answers: list[tuple[str, str]],
                  cache: Path, server_dir: Path, hardware: HardwareConfig
                  ) -> list[tuple[float | None, str | None]]:
    """synth.scorer=judge: each (question, answer)'s grade under a single rubric (its rating)
    or a criteria rubric (the criteria's mean), or None and the reason it has none. Asked and
    cached as eval=judge asks, so a re-run asks only what got no readable reply."""
    rubric = rubrics.load(judge.rubric)
    messages = rubrics.single_messages if rubric.kind == "single" else rubrics.criteria_messages
    distinct = dict.fromkeys(questions_and_answers)  # sampled answers often repeat
    asks = {(question, answer): Ask(str(index), None, 0, 0, None, messages(
        rubric, Prompt(str(index), (question,)), 0, [answer]))
        for index, (question, answer) in enumerate(distinct)}
    with server.judge_endpoint(judge, server_dir, hardware) as base_url:
        _ask_all(list(asks.values()), judge, rubric, cache, "synthesis", base_url)
    grades = []
    for ask in (asks[pair] for pair in questions_and_answers):
        graded = _graded(rubric, ask)
        if not graded["valid"]:
            grades.append((None, graded["reason"]))
        elif rubric.kind == "single":
            grades.append((graded["score"], None))
        else:
            grades.append((sum(graded["grades"].values()) / len(graded["grades"]), None))
    return grades


def _baseline_answer(baseline: dict, prompt_id: str, turn: int, sample: int) -> str | None:
    """The baseline's answer of the same sample, else its first (it may have fewer samples)."""
    return baseline.get((prompt_id, turn, sample), baseline.get((prompt_id, turn, 0)))


def _request(judge: JudgeEvalConfig, rubric: Rubric, messages: list[dict[str, str]],
             structured: bool) -> dict[str, Any]:
    request = {"model": judge.model, "messages": messages, "temperature": judge.temperature,
               "max_tokens": judge.max_tokens, **dict(judge.extra)}
    if structured and rubric.response_format():
        request["response_format"] = rubric.response_format()
    return request


def cache_key(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _ask_all(asks: list[Ask], judge: JudgeEvalConfig, rubric: Rubric, cache: Path,
             label: str, base_url: str) -> None:
    """Each ask's reply: from the cache, else from the judge, `concurrency` in flight. With
    structured_output=auto an endpoint that refuses response_format (400/422) is asked again
    without it, and so is every later request of this call."""
    import openai

    client = _client(judge, base_url)
    cache.mkdir(parents=True, exist_ok=True)
    structured = {"on": judge.structured_output != "none"}

    def one(ask: Ask) -> None:
        request = _request(judge, rubric, ask.messages, structured["on"])
        path = cache / f"{cache_key(request)}.json"
        if path.exists():
            ask.reply = {**json.loads(path.read_text()), "cached": True}
            return
        try:
            answer = client.chat.completions.create(**request)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            if "response_format" not in request or judge.structured_output != "auto":
                ask.reply = {"error": f"{type(exc).__name__}: {_short(exc)}"}
                return
            if structured["on"]:
                structured["on"] = False
                log.info("the judge's endpoint refused response_format (%s); asking without "
                         "it and parsing the answers", _short(exc))
            return one(ask)
        except (openai.APIError, ValueError) as exc:  # after the client's own retries
            ask.reply = {"error": f"{type(exc).__name__}: {_short(exc)}"}
            return
        usage = answer.usage.model_dump() if answer.usage else {}
        reply = {"text": answer.choices[0].message.content or "" if answer.choices else "",
                 "usage": {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")},
                 "model": judge.model, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if _readable(rubric, reply["text"]):  # an unreadable reply is asked again next run
            rundir.atomic_write_json(path, reply)
        ask.reply = {**reply, "cached": False}

    step = max(len(asks) // 10, 1)
    pool = ThreadPoolExecutor(judge.concurrency)
    try:
        futures = [pool.submit(one, ask) for ask in asks]
        for done, future in enumerate(as_completed(futures), 1):
            future.result()
            if done % step == 0 or done == len(asks):
                log.info("%s: judged %d/%d", label, done, len(asks))
    finally:  # on a stop, the queued requests are dropped; those in flight still get cached
        pool.shutdown(wait=False, cancel_futures=True)


def _readable(rubric: Rubric, text: str) -> bool:
    if rubric.kind == "single":
        return rubrics.read_rating(text, rubric.spec.scale)[0] is not None
    if rubric.kind == "pairwise":
        return rubrics.read_verdict(text)[0] is not None
    return rubrics.read_grades(rubric, text)[0] is not None


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def _judgments(rubric: Rubric, asks: list[Ask], order: dict[str, int]) -> list[dict[str, Any]]:
    """One record per judged answer (pairwise: both orders folded into one verdict)."""
    records = []
    by_answer: dict[tuple[str, int, int], dict[str, Ask]] = {}
    for ask in asks:
        by_answer.setdefault((ask.prompt_id, ask.turn, ask.sample), {})[ask.order or ""] = ask
    for (prompt_id, turn, sample), orders in by_answer.items():
        first = next(iter(orders.values()))
        record: dict[str, Any] = {"prompt_id": prompt_id, "category": first.category,
                                  "turn": turn, "sample": sample}
        if rubric.kind == "pairwise":
            record.update(_verdict(orders["AB"], orders["BA"]))
        else:
            record.update(_graded(rubric, orders[""]))
        records.append(record)
    return sorted(records, key=lambda r: (order[r["prompt_id"]], r["turn"], r["sample"]))


def _graded(rubric: Rubric, ask: Ask) -> dict[str, Any]:
    text, error = ask.reply.get("text"), ask.reply.get("error")
    found: dict[str, Any] = {"judge_text": text, "cached": bool(ask.reply.get("cached"))}
    if error:
        return {**found, "valid": False, "reason": error}
    if rubric.kind == "single":
        score, reason = rubrics.read_rating(text or "", rubric.spec.scale)
        return {**found, "valid": score is not None, "reason": reason, "score": score}
    grades, reason = rubrics.read_grades(rubric, text or "")
    return {**found, "valid": grades is not None, "reason": reason, "grades": grades}


def _verdict(first: Ask, second: Ask) -> dict[str, Any]:
    """Both orders: a win or loss counts only when both agree, anything else is a tie."""
    readings = []
    for ask in (first, second):
        if ask.reply.get("error"):
            readings.append((None, ask.reply["error"]))
        else:
            readings.append(rubrics.read_verdict(ask.reply.get("text") or ""))
    found = {"judge_text": {"AB": first.reply.get("text"), "BA": second.reply.get("text")},
             "cached": bool(first.reply.get("cached") and second.reply.get("cached"))}
    reasons = [f"{order}: {reason}" for order, (verdict, reason) in zip(("AB", "BA"), readings)
               if verdict is None]
    if reasons:
        return {**found, "valid": False, "reason": "; ".join(reasons), "verdict": None}
    mine = {"A": "win", "B": "loss", "tie": "tie"}[readings[0][0]]
    theirs = {"A": "loss", "B": "win", "tie": "tie"}[readings[1][0]]
    return {**found, "valid": True, "reason": None,
            "verdict": mine if mine == theirs else "tie"}


# ---------------------------------------------------------------------------------------------
# Metrics


def bootstrap_interval(values: list[float], samples: int, seed: int) -> tuple[float | None,
                                                                               float | None]:
    """The 2.5th and 97.5th percentiles of the mean over `samples` resamples."""
    import numpy as np

    if len(values) < 2:
        return None, None
    data = np.asarray(values, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(data), (samples, len(data)))
    means = data[picks].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def metric_rows(rubric: Rubric, judgments: list[dict[str, Any]], target: Target,
                evaluation: EvalConfig) -> list[dict[str, Any]]:
    valid = [j for j in judgments if j["valid"]]
    series: dict[str, list[float]] = {}
    if rubric.kind == "single":
        series["score"] = [j["score"] for j in valid]
        if len({j["turn"] for j in judgments}) > 1:
            for j in valid:
                series.setdefault(f"score/turn{j['turn'] + 1}", []).append(j["score"])
        for j in sorted(valid, key=lambda j: j["category"] or ""):
            if j["category"]:
                series.setdefault(f"score/{j['category']}", []).append(j["score"])
    elif rubric.kind == "pairwise":
        for outcome in ("win", "tie", "loss"):
            series[f"{outcome}_rate"] = [float(j["verdict"] == outcome) for j in valid]
    else:
        for name in rubric.spec.criteria:
            series[name] = [j["grades"][name] for j in valid]
    task = evaluation.generate.prompts if evaluation.generate.prompts in prompts.NAMED \
        else Path(evaluation.generate.prompts).stem
    base = {"checkpoint": target.label, "step": target.step, "backend": "judge", "task": task,
            "group": None, "num_fewshot": None, "eval_mode": evaluation.judge.rubric,
            "stderr": None}
    rows = []
    for metric, values in series.items():
        if not values:
            continue
        low, high = bootstrap_interval(values, evaluation.judge.bootstrap_samples,
                                       evaluation.seed)
        rows.append({**base, "metric": metric, "value": sum(values) / len(values),
                     "ci_low": low, "ci_high": high})
    rows.append({**base, "metric": "invalid", "value": len(judgments) - len(valid),
                 "ci_low": None, "ci_high": None})
    return rows


def planned_calls(evaluation: EvalConfig) -> tuple[int, int]:
    """Per judged checkpoint: (judge requests, estimated input tokens) at 4 characters a token,
    counting each answer at max_new_tokens. For dry_run's plan."""
    rubric = rubrics.load(evaluation.judge.rubric)
    chosen = prompts.load(evaluation.generate)
    per_answer = 2 if rubric.kind == "pairwise" else 1
    calls = tokens = 0
    answer_tokens = evaluation.generate.max_new_tokens * (2 if rubric.kind == "pairwise" else 1)
    for prompt in chosen:
        for turn in range(len(prompt.turns)):
            asked = sum(len(t) for t in prompt.turns[:turn + 1]) // 4 + 400  # rubric text
            calls += per_answer * evaluation.generate.num_samples
            tokens += per_answer * evaluation.generate.num_samples * (
                asked + answer_tokens * (turn + 1))
    return calls, tokens

