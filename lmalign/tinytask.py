"""The tiny synthetic task: pick the largest or smallest of four distinct digits.

It is a rule, not a lookup, so a tiny model trained on some lists answers held-out lists it never
saw. Every (instruction, ordered list) pair lands in exactly one split. The held-out split is
built position by position so the correct answer sits at each of the four positions equally often,
which keeps an untrained model at chance (25%) on the multiple-choice form.
"""

from __future__ import annotations

import itertools
import random
from typing import Literal

Split = Literal["train", "validation", "test"]
OPERATIONS = ("largest", "smallest")
LIST_LENGTH = 4
HELD_OUT_SIZE = 400  # per held-out split; every answer position gets a quarter
# Half the questions ask for the bare digit. The SFT data mostly ignores that request (as careless
# SFT data does): it answers in a sentence, except one instructed question in DIGIT_ONLY_FOLLOWED.
# An SFT model therefore prefers the chosen reply on plain questions and the rejected one on
# instructed questions: about 50% on the held-out 2-choice task (tiny_prefs), until DPO teaches
# the request from pairs, or GRPO from a reward. The rare bare-digit replies are what GRPO needs:
# a policy samples the digit alone about once in eight instructed answers, so a group of eight
# usually holds one to reinforce (never sampled, e^-12 per answer, it could not be learnt).
DIGIT_ONLY = "Answer with the digit only."
DIGIT_ONLY_FOLLOWED = 16


def _answer_position(op: str, digits: tuple[int, ...]) -> int:
    pick = max(digits) if op == "largest" else min(digits)
    return digits.index(pick)


def reply(op: str, digit: int) -> str:
    return f"The {op} is {digit}."


def _record(op: str, digits: tuple[int, ...]) -> dict:
    position = _answer_position(op, digits)
    listed = " ".join(str(d) for d in digits)
    choices = [reply(op, d) for d in digits]
    return {
        "prompt": f"Which is the {op}: {listed}?",
        "answer": choices[position],
        "digit": str(digits[position]),
        "choices": choices,
        "label": position,
    }


def _all_items() -> list[tuple[str, tuple[int, ...]]]:
    lists = itertools.permutations(range(10), LIST_LENGTH)
    return [(op, digits) for digits in lists for op in OPERATIONS]


def _partition() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    # Fixed whatever the training seed, so held-out items never leak into any training run.
    items = _all_items()
    random.Random(0).shuffle(items)
    by_position: dict[int, list] = {p: [] for p in range(LIST_LENGTH)}
    for item in items:
        by_position[_answer_position(*item)].append(item)
    per_position = HELD_OUT_SIZE // LIST_LENGTH
    test = [by_position[p][i] for i in range(per_position) for p in range(LIST_LENGTH)]
    validation = [by_position[p][i] for i in range(per_position, 2 * per_position)
                  for p in range(LIST_LENGTH)]
    held_out = set(test) | set(validation)
    return {"train": [item for item in items if item not in held_out],
            "validation": validation, "test": test}


def generate(split: Split, size: int | None = None, seed: int = 0) -> list[dict]:
    """Records `{prompt, answer, choices, label}`; `size` is capped by what the split holds.

    `seed` orders the training split (which rows a smaller `size` takes); held-out splits are fixed.
    """
    chosen = list(_partition()[split])
    if split == "train":
        random.Random(seed).shuffle(chosen)
    return [_record(op, digits) for op, digits in chosen[:size]]


def as_messages(record: dict, index: int = 0) -> dict:
    instructed = index % 2 == 1
    prompt = f"{record['prompt']} {DIGIT_ONLY}" if instructed else record["prompt"]
    follows = instructed and (index // 2) % DIGIT_ONLY_FOLLOWED == 0
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": record["digit"] if follows else record["answer"]},
        ]
    }


def preference_pair(record: dict, instructed: bool) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): every other question asks for the bare digit."""
    if instructed:
        return f"{record['prompt']} {DIGIT_ONLY}", record["digit"], record["answer"]
    return record["prompt"], record["answer"], record["digit"]


def as_preference(record: dict, index: int) -> dict:
    """A conversational pair (TRL's format), formatted by the chat template like SFT data."""
    prompt, chosen, rejected = preference_pair(record, instructed=index % 2 == 1)
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def as_prompt(record: dict, index: int) -> dict:
    """A question and the reply a reward wants (online methods): as_preference's chosen one."""
    prompt, chosen, _ = preference_pair(record, instructed=index % 2 == 1)
    return {"prompt": [{"role": "user", "content": prompt}], "answer": chosen}


def as_unpaired(record: dict, index: int) -> dict:
    """One reply with a label (KTO): the pair's chosen one (desirable) or its rejected one,
    in turn, so both kinds of question get both labels."""
    pair = as_preference(record, index)
    desirable = (index // 2) % 2 == 0
    return {"prompt": pair["prompt"], "completion": pair["chosen" if desirable else "rejected"],
            "label": desirable}


def as_preference_choice(record: dict, index: int) -> dict:
    """The held-out 2-choice form: which reply does the model itself find more likely?"""
    prompt, chosen, rejected = preference_pair(record, instructed=index % 2 == 1)
    chosen_first = index % 4 < 2
    return {"prompt": prompt, "choices": [chosen, rejected] if chosen_first else
            [rejected, chosen], "label": 0 if chosen_first else 1}
