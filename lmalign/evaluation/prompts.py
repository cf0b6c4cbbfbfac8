"""Prompt sets for eval=generate: the named ones shipped with lmalign, or a file of your own.

- `mt_bench`: MT-Bench's 80 two-turn questions in 8 categories, with FastChat's 30 reference
  answers (lmalign/data/mt_bench, Apache-2.0, verbatim).
- `ifeval`: IFEval's 541 prompts (lmalign/data/ifeval, Apache-2.0, verbatim).
- `gsm8k`: GSM8K's 1,319 test questions, each with its worked solution as reference
  (lmalign/data/gsm8k, MIT, verbatim).
- `tiny`: the tiny task's held-out test questions, each with its correct answer as reference.
- a file (jsonl/json/parquet/csv, optionally compressed) or a datasets directory: one prompt per
  row from its `prompt` column, or a list of user turns from its `turns` column; other names
  through `eval.generate.columns` ({prompt: question}, {turns: dialogue}, {id: key}, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmalign.errors import UserError, problem
from lmalign.schema import GenerateConfig

DATA = Path(__file__).resolve().parent.parent / "data"
NAMED = ("mt_bench", "ifeval", "gsm8k", "tiny")
COLUMNS = ("prompt", "turns", "id", "category", "reference")  # what a file's columns map onto
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Prompt:
    id: str
    turns: tuple[str, ...]  # the user's turns; turn 2 is asked after the model's own turn 1
    category: str | None = None
    reference: tuple[str, ...] | None = None  # per turn, where the set has reference answers


def load(generate: GenerateConfig) -> list[Prompt]:
    """The prompt set, capped at max_prompts (the first ones, in the set's own order)."""
    chosen = named_or_file(generate.prompts, generate.columns)
    if generate.max_prompts is not None:
        chosen = chosen[:generate.max_prompts]
    return chosen


def named_or_file(name: str, columns: dict[str, str] | None = None) -> list[Prompt]:
    """A named set's prompts, or a file's (its columns mapped through `columns`)."""
    found = {"mt_bench": _mt_bench, "ifeval": _ifeval, "gsm8k": _gsm8k, "tiny": _tiny}.get(name)
    return found() if found else _from_file(Path(name).expanduser(), columns or {})


def check(generate: GenerateConfig) -> list[str]:
    """Before any model loads: the set exists and its rows are prompts. Every problem at once."""
    if generate.prompts in NAMED:
        return []
    path = Path(generate.prompts).expanduser()
    if not path.exists():
        return [problem("eval.generate.prompts", generate.prompts, "no such named set or file",
                        f"{', '.join(NAMED)}, or a jsonl/json/parquet/csv file or datasets "
                        "directory", "eval.generate.prompts=mt_bench, or the file's path")]
    try:
        if not load(generate):
            return [problem("eval.generate.prompts", generate.prompts, "holds no prompts",
                            "a file with at least one row", "point at the prompts file")]
    except UserError as exc:
        return exc.problems
    return []


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mt_bench() -> list[Prompt]:
    references = {row["question_id"]: tuple(row["choices"][0]["turns"])
                  for row in _jsonl(DATA / "mt_bench" / "reference_answer_gpt-4.jsonl")}
    return [Prompt(str(row["question_id"]), tuple(row["turns"]), row["category"],
                   references.get(row["question_id"]))
            for row in _jsonl(DATA / "mt_bench" / "question.jsonl")]


def _ifeval() -> list[Prompt]:
    return [Prompt(str(row["key"]), (row["prompt"],))
            for row in _jsonl(DATA / "ifeval" / "input_data.jsonl")]


def _gsm8k() -> list[Prompt]:
    return [Prompt(f"gsm8k-{index}", (row["question"],), None, (row["answer"],))
            for index, row in enumerate(_jsonl(DATA / "gsm8k" / "test.jsonl"))]


def _tiny() -> list[Prompt]:
    from lmalign import tinytask

    return [Prompt(f"tiny-{index}", (record["prompt"],), None, (record["answer"],))
            for index, record in enumerate(tinytask.generate("test"))]


def _from_file(path: Path, columns: dict[str, str]) -> list[Prompt]:
    unknown = [key for key in columns if key not in COLUMNS]
    if unknown:
        raise UserError([problem(f"eval.generate.columns.{key}", columns[key], "not a prompt "
                                 "field", ", ".join(COLUMNS), f"remove eval.generate.columns.{key}")
                         for key in unknown])
    rows = _rows(path)
    found = list(rows[0]) if rows else []
    names = {field: columns.get(field, field) for field in COLUMNS}
    if names["prompt"] not in found and names["turns"] not in found:
        raise UserError(problem(
            "eval.generate.columns", dict(columns), f"{path} has neither a "
            f"{names['prompt']!r} nor a {names['turns']!r} column (columns: {', '.join(found)})",
            "a column of prompts, or of lists of user turns",
            f"eval.generate.columns={{prompt: {found[0] if found else '<column>'}}}"))
    prompts = []
    for index, row in enumerate(rows):
        turns = row.get(names["turns"]) or [row.get(names["prompt"])]
        if not isinstance(turns, list) or not all(isinstance(t, str) and t.strip()
                                                  for t in turns):
            raise UserError(problem("eval.generate.prompts", str(path), f"row {index + 1} has no "
                                    "prompt text", "a non-empty prompt, or a list of non-empty "
                                    "user turns, in every row", "fix or drop that row"))
        reference = row.get(names["reference"])
        prompts.append(Prompt(str(row.get(names["id"], index)), tuple(turns),
                              row.get(names["category"]),
                              (reference,) if isinstance(reference, str) else
                              tuple(reference) if reference else None))
    return prompts


def _rows(path: Path) -> list[dict[str, Any]]:
    """The file's rows, read directly (no datasets cache for a few prompts); a broken JSON line
    is named by line and column, as for training data."""
    import gzip

    from lmalign.data_preflight import parse_problems

    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(problem(
                "eval.generate.prompts", str(path), "a directory that save_to_disk did not "
                "write", "a datasets directory, or a jsonl/json/parquet/csv file",
                "point at the prompts file, or save the prompts with save_to_disk")) from None
        split = next(iter(loaded.values())) if isinstance(loaded, datasets.DatasetDict) \
            else loaded
        return split.to_list()
    suffixes = [s for s in path.suffixes if s not in (".gz",)]
    kind = suffixes[-1] if suffixes else ""
    if kind not in FILE_TYPES:
        raise UserError(problem("eval.generate.prompts", str(path), "unknown file type",
                                ", ".join(FILE_TYPES) + " (optionally .gz), or a datasets "
                                "directory", "convert the file"))
    problems = parse_problems(path, "eval.generate.prompts")
    if problems:
        raise UserError(problems)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        if kind == ".csv":
            import csv

            return list(csv.DictReader(handle))
        text = handle.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return document if isinstance(document, list) else [document]
