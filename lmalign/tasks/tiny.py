"""lm-eval dataset loader for the tiny synthetic task: the same held-out splits training never sees."""

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
