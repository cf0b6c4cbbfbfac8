"""Datasets: the tiny synthetic task, hub datasets and a user's local files, in TRL's formats.

Every source ends as a `datasets.Dataset` with exactly the canonical columns of its format:
messages -> messages; prompt_completion -> prompt, completion; text -> text;
preference -> prompt, chosen, rejected (the prompt is extracted when it is implicit);
prompt -> prompt, and every other column (the answer a reward checks), for online methods;
unpaired -> prompt, completion, label (KTO; chat messages with a label give their last assistant
turn as the completion, and dataset.unpair turns preference pairs into these rows).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from lmalign import tinytask
from lmalign.errors import UserError, problem
from lmalign.schema import DatasetConfig

log = logging.getLogger(__name__)

CANONICAL_COLUMNS = {
    "messages": ["messages"],
    "prompt_completion": ["prompt", "completion"],
    "text": ["text"],
    "preference": ["prompt", "chosen", "rejected"],
    "prompt": ["prompt"],
    "unpaired": ["prompt", "completion", "label"],
}
# Columns a format may map besides its canonical ones: the reference answer rewards read.
OPTIONAL_COLUMNS = {"prompt": ["answer"]}
# A stage=synthesize run's outputs, by the format a training run reads (dataset=synthetic).
SYNTHESIZED_PARTS = {"messages": "sft", "preference": "preferences"}
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
                  ".csv": "csv"}


def synthesized_part(from_run: str, data_format: str, runs_root: str) -> Path | None:
    """The sft/ or preferences/ directory of a finished stage=synthesize run, or None."""
    from lmalign.models import run_candidates

    for candidate in run_candidates(from_run, runs_root):
        part = candidate / SYNTHESIZED_PARTS[data_format]
        if (part / "data.jsonl").exists():
            return part.resolve()
    return None


def load_splits(dataset: DatasetConfig):
    """(train, eval or None), normalised to the format's canonical columns."""
    train, evaluation = _load_splits(dataset)
    if dataset.unpair:
        from trl.data_utils import unpair_preference_dataset

        train = unpair_preference_dataset(train)
        evaluation = unpair_preference_dataset(evaluation) if evaluation is not None else None
    if dataset.prompt_template is not None:
        train = _templated(train, dataset.prompt_template)
        evaluation = (_templated(evaluation, dataset.prompt_template)
                      if evaluation is not None else None)
    return train, evaluation


def _load_splits(dataset: DatasetConfig):
    if dataset.source == "tiny":
        return _tiny_split(dataset, "train", dataset.max_samples), (
            _tiny_split(dataset, "validation", dataset.max_eval_samples)
            if dataset.eval_split else None)
    splits = load_raw(dataset)
    train = pick_split(splits, dataset.train_split, "dataset.train_split", dataset)
    evaluation = None
    if dataset.eval_split:
        evaluation = pick_split(splits, dataset.eval_split, "dataset.eval_split", dataset)
    train = prepare(train, dataset)
    if evaluation is not None:
        evaluation = prepare(evaluation, dataset)
    elif dataset.eval_size > 0:
        parts = train.train_test_split(test_size=dataset.eval_size, seed=dataset.seed)
        train, evaluation = parts["train"], parts["test"]
    train = _cap(train, dataset.max_samples)
    evaluation = _cap(evaluation, dataset.max_eval_samples) if evaluation is not None else None
    return train, evaluation


def _tiny_split(dataset: DatasetConfig, split: str, size: int | None):
    from datasets import Dataset

    records = tinytask.generate(split, size, seed=dataset.seed)
    if dataset.format == "messages":
        rows = [tinytask.as_messages(r, i) for i, r in enumerate(records)]
    elif dataset.format == "preference":
        rows = [tinytask.as_preference(r, i) for i, r in enumerate(records)]
    elif dataset.format == "prompt":
        rows = [tinytask.as_prompt(r, i) for i, r in enumerate(records)]
    elif dataset.format == "unpaired":
        rows = [tinytask.as_unpaired(r, i) for i, r in enumerate(records)]
    elif dataset.format == "prompt_completion":
        rows = [{"prompt": r["prompt"], "completion": r["answer"]} for r in records]
    else:
        rows = [{"text": f"{r['prompt']} {r['answer']}"} for r in records]
    return Dataset.from_list(rows)


def load_raw(dataset: DatasetConfig):
    import datasets

    if dataset.source == "hub":
        return datasets.load_dataset(dataset.path, name=dataset.subset, revision=dataset.revision)
    path = Path(dataset.path).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) \
                else datasets.DatasetDict({dataset.train_split: loaded})
        return datasets.load_dataset(str(path))  # a folder of data files, laid out like a hub repo
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    builder = _LOCAL_FORMATS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise UserError(problem("dataset.path", str(path), "unknown file type",
                                ", ".join(_LOCAL_FORMATS) + " (optionally .gz), or a directory",
                                "convert the file, or point at a save_to_disk directory"))
    # Local files come in as one split, named after dataset.train_split.
    return datasets.load_dataset(builder, data_files={dataset.train_split: str(path)})


def pick_split(splits, name: str, key: str, dataset: DatasetConfig):
    if name not in splits:
        raise UserError(problem(key, name, f"no such split in {dataset.path or dataset.name}",
                                ", ".join(splits), f"{key}={next(iter(splits))}"))
    return splits[name]


def _cap(data, limit: int | None):
    return data.select(range(min(limit, len(data)))) if limit is not None else data


def prepare(data, dataset: DatasetConfig):
    """Rows filtered by dataset.where and mapped onto the format's canonical columns."""
    found = list(data.column_names)
    for column, value in dataset.where.items():
        if column not in found:
            raise UserError(problem(f"dataset.where.{column}", value,
                                    f"column {column!r} not found", "columns found: "
                                    + ", ".join(found), f"remove dataset.where.{column}"))
    if dataset.where:
        data = data.filter(lambda row: all(row[c] == v for c, v in dataset.where.items()))

    if dataset.format == "prompt":
        return _prepare_prompts(data, dataset)
    if dataset.format == "unpaired" and "completion" not in found \
            and "completion" not in dataset.columns and "messages" in found:
        data = data.map(_unpaired_from_messages, remove_columns=["messages"],
                        desc="completions from chat messages")
        found = list(data.column_names)
    canonical = CANONICAL_COLUMNS[dataset.format]
    if dataset.columns:
        mapping = dict(dataset.columns)
        unknown = [c for c in mapping if c not in canonical]
        if unknown:
            raise UserError(problem(f"dataset.columns.{unknown[0]}", mapping[unknown[0]],
                                    f"not a column of format {dataset.format}",
                                    ", ".join(canonical), f"remove dataset.columns.{unknown[0]}"))
    else:
        mapping = {c: c for c in canonical if c in found}
    required = [c for c in canonical if not (dataset.format == "preference" and c == "prompt")]
    missing = [c for c in required if c not in mapping]
    missing += [mapping[c] for c in mapping if mapping[c] not in found]
    if missing:
        other = _format_of(found, dataset.format)
        raise UserError([
            problem(f"dataset.columns.{_canonical_for(m, mapping)}", m,
                    f"column {m!r} not found in {dataset.path or dataset.name}",
                    "columns found: " + ", ".join(found),
                    f"dataset.format={other} (the columns found are that format's)" if other
                    else f"+dataset.columns.{_canonical_for(m, mapping)}=<one of the columns "
                    "found>")
            for m in missing])
    data = data.select_columns(list(mapping.values()))
    data = data.rename_columns({src: dst for dst, src in mapping.items() if src != dst})
    if dataset.format == "preference" and "prompt" not in mapping:
        data = data.map(extract_prompt, desc="extracting implicit prompts")
    return data


def _prepare_prompts(data, dataset: DatasetConfig):
    """Prompts for online methods: a prompt column (text, or messages), or chat messages whose
    last assistant turn is dropped and kept as `answer` (a reference for rewards). Every other
    column stays: TRL hands them to the reward functions by name."""
    found = list(data.column_names)
    allowed = CANONICAL_COLUMNS["prompt"] + OPTIONAL_COLUMNS["prompt"]
    problems = [problem(f"dataset.columns.{c}", src, "not a column of format prompt",
                        ", ".join(allowed), f"remove dataset.columns.{c}")
                for c, src in dataset.columns.items() if c not in allowed]
    problems += [problem(f"dataset.columns.{c}", src, f"column {src!r} not found in "
                         f"{dataset.path or dataset.name}", "columns found: " + ", ".join(found),
                         f"dataset.columns.{c}=<one of the columns found>")
                 for c, src in dataset.columns.items() if c in allowed and src not in found]
    if problems:
        raise UserError(problems)
    renames = {src: dst for dst, src in dataset.columns.items() if src != dst}
    taken = [dst for dst in renames.values() if dst in found and dst not in renames]
    data = data.remove_columns(taken).rename_columns(renames) if renames else data
    if "messages" in data.column_names and "prompt" not in data.column_names:
        data = data.map(_prompt_from_messages, remove_columns=["messages"],
                        desc="prompts from chat messages")
    if "prompt" not in data.column_names:
        raise UserError(problem(
            "dataset.format", "prompt", f"no prompts in {dataset.path or dataset.name}: neither a "
            "prompt column nor chat messages", "columns found: " + ", ".join(found),
            "+dataset.columns.prompt=<the question column>, or another dataset.format"))
    return data


def _templated(data, template: str):
    """Each prompt written into the template (a chat prompt: its last user turn); the template's
    other fields read the row's columns (validate.py checked it holds {prompt})."""
    from lmalign.validate import template_fields

    unknown = sorted(set(template_fields(template)) - set(data.column_names))
    if unknown:
        raise UserError(problem(
            "dataset.prompt_template", template, f"names {{{unknown[0]}}}, not a column of the "
            "data", "fields among the columns: " + ", ".join(data.column_names),
            f"remove {{{unknown[0]}}} from dataset.prompt_template ({{{{ }}}} for a brace)"))

    def fill(row: dict[str, Any]) -> dict[str, Any]:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return {"prompt": template.format_map({**row, "prompt": prompt})}
        turns = [dict(turn) for turn in prompt]
        last = max((i for i, t in enumerate(turns) if t.get("role") == "user"), default=None)
        if last is not None:
            turns[last]["content"] = template.format_map({**row, "prompt": turns[last]["content"]})
        return {"prompt": turns}

    return data.map(fill, desc="prompts into dataset.prompt_template")


def _prompt_from_messages(row: dict[str, Any]) -> dict[str, Any]:
    messages = list(row["messages"])
    answer = None
    if messages and messages[-1].get("role") == "assistant":
        answer = messages.pop()["content"]
    found = {"prompt": messages}
    if "answer" not in row:
        found["answer"] = answer
    return found


def _unpaired_from_messages(row: dict[str, Any]) -> dict[str, Any]:
    """The last assistant turn is the labelled completion; the turns before it, the prompt."""
    messages = list(row["messages"])
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return {"prompt": messages, "completion": []}
    return {"prompt": messages[:last], "completion": [messages[last]]}


def _format_of(columns: list[str], unlike: str) -> str | None:
    """Another format whose canonical columns are all among these."""
    return next((fmt for fmt, needed in CANONICAL_COLUMNS.items() if fmt != unlike
                 and all(c in columns for c in needed if not (fmt == "preference"
                                                               and c == "prompt"))), None)


def _canonical_for(column: str, mapping: dict[str, str]) -> str:
    return next((c for c, src in mapping.items() if src == column), column)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialogue(text: str) -> list[dict[str, str]] | None:
    """HH-RLHF's "\\n\\nHuman: ...\\n\\nAssistant: ..." text as chat messages, else None."""
    pieces = _HH_TURN.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        return None
    return [{"role": _HH_ROLES[role], "content": content.strip()}
            for role, content in zip(pieces[1::2], pieces[2::2])]


def extract_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """Split the shared opening of chosen/rejected off as the prompt (TRL's own rule)."""
    from trl.data_utils import extract_prompt as trl_extract_prompt

    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        as_chosen, as_rejected = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
        if as_chosen and as_rejected:
            chosen, rejected = as_chosen, as_rejected
    return trl_extract_prompt({"chosen": chosen, "rejected": rejected})
