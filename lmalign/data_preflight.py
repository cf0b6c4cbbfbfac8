"""The training data checked before any model loads: it reads, it has rows, and its rows have
what the format needs. Every problem is one line (docs/design.md, Errors and exit codes).

A local JSON or JSONL file is parsed whole here first, so that a broken line is named by file,
line and column (datasets' own loader buries that under a long traceback); then the data is
loaded the way training loads it (lmalign.data), and the row counts after each filter are
logged. A hub dataset is checked on its first rows, streamed.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

from lmalign import data
from lmalign.machine import hub_offline, hub_reachable
from lmalign.errors import UserError, problem
from lmalign.schema import DatasetConfig

log = logging.getLogger(__name__)
HUB_ROWS = 1000  # how many rows of a hub dataset are checked
MAX_CHECKED = 100_000  # rows of a local dataset whose contents are checked
ROLES = ("system", "user", "assistant", "tool")


def preflight(dataset: DatasetConfig) -> list[str]:
    """The problems of the training data, or [] when it will train; logs the row counts."""
    if dataset.source == "tiny":
        return []
    if dataset.source == "local":
        path = Path(str(dataset.path)).expanduser()
        if path.is_file():
            problems = parse_problems(path)
            if problems:
                return problems
    import datasets

    quiet = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a check, not the loading a user waits for
    try:
        rows, counts = _rows(dataset)
    except UserError as exc:
        return exc.problems
    except Exception as exc:  # the library's own message says what it could not read
        return [problem("dataset.path", dataset.path, f"could not be read "
                        f"({type(exc).__name__}: {_first_line(exc)})",
                        "a readable dataset of the format's columns", "check the file or repo")]
    finally:
        if quiet:
            datasets.enable_progress_bars()
    counts_text = "; ".join(f"{count} {what}" for what, count in counts)
    log.info("data: %s", counts_text)
    if not rows:
        return [problem("dataset.path", dataset.path, f"no rows to train on ({counts_text})",
                        "a dataset with at least one row", "check the file, dataset.where and "
                        "dataset.train_split")]
    return _row_problems(dataset, rows)


def parse_problems(path: Path, key: str = "dataset.path") -> list[str]:
    """A JSON or JSONL file read whole: the first broken line by line and column, or empty.
    `key`: the setting that named the file."""
    suffixes = [s for s in path.suffixes if s != ".gz"]
    if not suffixes or suffixes[-1] not in (".json", ".jsonl"):
        return [] if path.stat().st_size else [_empty(path, key)]
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        return [problem(key, str(path), f"could not be read ({exc})",
                        "a UTF-8 JSON or JSONL file", "check the file")]
    if not text.strip():
        return [_empty(path, key)]
    try:  # a .json file may hold one document (a list of rows), or one row per line
        document = json.loads(text)
    except json.JSONDecodeError as whole:
        if suffixes[-1] == ".json" and not _looks_like_lines(text):
            return [_broken(path, whole.lineno, whole.colno, whole.msg, key)]
    else:
        if isinstance(document, dict):
            return []  # one row, or datasets' {"data": [...]} layout
        rows = document if isinstance(document, list) else [document]
        odd = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        return [] if odd is None else [problem(
            key, str(path), f"row {odd + 1} is {json.dumps(rows[odd])[:40]}, not an "
            "object of columns", "a list of objects, or one object per line", "check the file")]
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as broken:
                return [_broken(path, number, broken.colno, broken.msg, key)]
            if not isinstance(row, dict):
                return [problem(key, str(path), f"line {number} is "
                                f"{line.strip()[:40]}, not an object of columns",
                                "one JSON object per line", f"fix line {number} of {path.name}")]
    return []


def _looks_like_lines(text: str) -> bool:
    first = text.lstrip()[:1]
    return first == "{" and "\n{" in text


def _broken(path: Path, line: int, column: int, message: str, key: str) -> str:
    return problem(key, str(path), f"line {line}, column {column}: not JSON "
                   f"({message})", "one JSON object per line (JSONL), or a JSON list of objects",
                   f"fix line {line} of {path.name}, or remove it")


def _empty(path: Path, key: str = "dataset.path") -> str:
    return problem(key, str(path), "the file is empty", "a file with rows",
                   "check the path, or write the data first")


def _rows(dataset: DatasetConfig) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """The training split's rows as training will see them, and the counts along the way."""
    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "") or hub_offline()
    on_disk = Path(str(dataset.path)).expanduser().exists()  # a hub dataset's local copy
    if dataset.source == "hub" and not offline and not on_disk:
        import datasets

        if not hub_reachable():  # datasets would retry for most of a minute, then raise
            raise UserError(problem(
                "dataset.path", dataset.path, "a hub dataset, and the hub cannot be reached from "
                "this machine", "a reachable hub, a local copy, or an offline cache",
                "dataset=local dataset.path=<a copy>, or stage=cache_prepare on a connected "
                "machine and offline=true cache.dir=<the cache> here"))
        stream = datasets.load_dataset(dataset.path, name=dataset.subset,
                                       revision=dataset.revision, split=dataset.train_split,
                                       streaming=True)
        head = datasets.Dataset.from_list(list(stream.take(HUB_ROWS)))
        counts = [(f"rows checked of {dataset.path} (its first {HUB_ROWS})", len(head))]
        prepared = data.prepare(head, dataset)
    else:
        splits = data.load_raw(dataset)
        raw = data.pick_split(splits, dataset.train_split, "dataset.train_split", dataset)
        counts = [(f"rows in {dataset.path} ({dataset.train_split})", len(raw))]
        prepared = data.prepare(raw, dataset)
    if dataset.where:
        counts.append(("after dataset.where", len(prepared)))
    if dataset.max_samples is not None and dataset.max_samples < len(prepared):
        counts.append(("used (dataset.max_samples)", dataset.max_samples))
    return prepared.select(range(min(len(prepared), MAX_CHECKED))).to_list(), counts


def _row_problems(dataset: DatasetConfig, rows: list[dict[str, Any]]) -> list[str]:
    """What the format needs of each row: the first offending row and how many there are."""
    check = {"messages": _messages_problem, "prompt_completion": _completion_problem,
             "text": _text_problem, "preference": _preference_problem,
             "prompt": _prompt_problem, "unpaired": _unpaired_problem}[dataset.format]
    found: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        what = check(row)
        if what:
            found.setdefault(what, []).append(index)
    return [problem("dataset.path", dataset.path, f"row {indices[0] + 1}"
                    + (f" (and {len(indices) - 1} more of {len(rows)})" if len(indices) > 1
                       else f" of {len(rows)}") + f": {what}", _allowed(dataset.format),
                    _fix(what, dataset))
            for what, indices in found.items()]


def _messages_problem(row: dict[str, Any]) -> str | None:
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        return "its messages are not a list of turns"
    if not all(isinstance(t, dict) for t in turns):
        return "a turn is not a mapping of role and content"
    if all("from" in t and "value" in t for t in turns):
        return "turns use ShareGPT's from/value keys"
    if not all("role" in t and "content" in t for t in turns):
        return "a turn lacks role or content"
    unknown = sorted({str(t["role"]) for t in turns} - set(ROLES))
    if unknown:
        return f"unknown role {', '.join(unknown)}"
    if not any(t["role"] == "assistant" for t in turns):
        return "no assistant turn (nothing to learn)"
    return None


def _completion_problem(row: dict[str, Any]) -> str | None:
    if not row.get("completion"):
        return "an empty completion"
    return None if row.get("prompt") is not None else "no prompt"


def _text_problem(row: dict[str, Any]) -> str | None:
    return None if isinstance(row.get("text"), str) and row["text"].strip() else "empty text"


def _preference_problem(row: dict[str, Any]) -> str | None:
    if not row.get("chosen") or not row.get("rejected"):
        return "an empty chosen or rejected answer"
    return None


def _prompt_problem(row: dict[str, Any]) -> str | None:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return None if prompt.strip() else "an empty prompt"
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(t, dict) and "role" in t and "content" in t for t in prompt):
        return "its prompt is neither text nor a list of {role, content} turns"
    return None if prompt[-1]["role"] == "user" else "its prompt does not end with a user turn"


def _unpaired_problem(row: dict[str, Any]) -> str | None:
    if not isinstance(row.get("label"), bool):
        return "its label is not true or false"
    if not row.get("completion"):
        return "an empty completion (or no assistant turn)"
    return None if row.get("prompt") is not None else "no prompt"


def _allowed(fmt: str) -> str:
    return {"messages": "chat rows: a list of {role, content} turns (roles "
                        f"{', '.join(ROLES)}) with at least one assistant turn",
            "prompt_completion": "a prompt and a non-empty completion",
            "text": "non-empty text",
            "preference": "a prompt with non-empty chosen and rejected answers",
            "prompt": "a prompt: text, or chat turns ending with the user's",
            "unpaired": "a prompt, a non-empty completion and a label true (desirable) or "
                        "false"}[fmt]


def _fix(what: str, dataset: DatasetConfig) -> str:
    if "ShareGPT" in what:
        return ("convert the turns to role/content (from: human -> role: user, gpt -> "
                "assistant, system -> system; value -> content)")
    if "assistant" in what:
        return "keep only conversations that end with an answer, or dataset.where=... to skip them"
    return f"fix or drop those rows (dataset.where) in {dataset.path}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
