"""The tiny synthetic task: disjoint splits, balanced answer positions."""

from collections import Counter

from lmalign import tinytask


def _key(record):
    return record["prompt"]


def test_held_out_splits_are_disjoint_from_training_whatever_the_seed():
    test = {_key(r) for r in tinytask.generate("test")}
    validation = {_key(r) for r in tinytask.generate("validation")}
    assert len(test) >= 200 and len(validation) >= 200 and not test & validation
    for seed in (0, 1, 7):
        train = {_key(r) for r in tinytask.generate("train", seed=seed)}
        assert not train & test and not train & validation


def test_answer_positions_are_balanced_in_held_out_splits():
    for split in ("test", "validation"):
        positions = Counter(r["label"] for r in tinytask.generate(split))
        assert len(positions) == tinytask.LIST_LENGTH
        assert max(positions.values()) == min(positions.values())


def test_records_are_consistent():
    for record in tinytask.generate("train", 50):
        assert record["choices"][record["label"]] == record["answer"]
        op = "largest" if "largest" in record["prompt"] else "smallest"
        digits = [int(d) for d in record["prompt"].rstrip("?").split(": ")[1].split()]
        assert record["answer"] == tinytask.reply(op, max(digits) if op == "largest" else min(digits))


def test_training_order_depends_on_seed_only():
    assert tinytask.generate("train", 5, seed=3) == tinytask.generate("train", 5, seed=3)
    assert tinytask.generate("train", 5, seed=3) != tinytask.generate("train", 5, seed=4)
