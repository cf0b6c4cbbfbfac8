"""lm-eval dataset loaders: the tiny synthetic task (the same held-out splits training never sees)
and the GSM8K test set lmalign ships (gsm8k_local)."""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict

from lmalign import tinytask


def load(**_: object) -> DatasetDict:
    return DatasetDict({
        split: Dataset.from_list(tinytask.generate(split, tinytask.HELD_OUT_SIZE))
        for split in ("validation", "test")
    })


def load_prefs(**_: object) -> DatasetDict:
    return DatasetDict({
        split: Dataset.from_list([tinytask.as_preference_choice(r, i) for i, r in
                                  enumerate(tinytask.generate(split, tinytask.HELD_OUT_SIZE))])
        for split in ("validation", "test")
    })


def load_gsm8k(**_: object) -> DatasetDict:
    path = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})
