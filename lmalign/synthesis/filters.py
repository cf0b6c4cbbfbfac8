"""What synthesis drops, step by step, with a count per reason for the data card.

Near-duplicates are found with datasketch's MinHash LSH over word 3-gram shingles: MinHash is
the standard estimate of Jaccard similarity for deduplicating generated text (the Magpie and
FineWeb pipelines use it), and LSH finds the candidates without comparing every pair, so a
million instructions cost seconds. The first of a group (in item order) is kept.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from lmalign.schema import SynthFilters

NUM_PERM = 128


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, size: int = 3) -> set[str]:
    words = normalised(text).split()
    if len(words) < size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def excluded(patterns: list[str]) -> Callable[[str], bool]:
    compiled = [re.compile(p, re.IGNORECASE) for p in patterns]
    return lambda text: any(p.search(text) for p in compiled)


def instructions(items: Iterable[dict[str, Any]], filters: SynthFilters
                 ) -> tuple[list[dict[str, Any]], Counter]:
    """(kept, dropped per reason). Each item: {id, instruction, finish_reason}."""
    from datasketch import MinHash, MinHashLSH

    dropped: Counter = Counter()
    is_excluded = excluded(filters.exclude_patterns)
    seen: set[str] = set()
    index = MinHashLSH(threshold=filters.near_duplicate_threshold, num_perm=NUM_PERM) \
        if filters.near_duplicate_threshold else None
    kept = []
    for item in items:
        text = item["instruction"]
        if not text.strip():
            dropped["empty"] += 1
        elif item.get("finish_reason") == "length":
            dropped["truncated"] += 1
        elif not filters.min_instruction_chars <= len(text) <= filters.max_instruction_chars:
            dropped["length"] += 1
        elif is_excluded(text):
            dropped["excluded"] += 1
        elif normalised(text) in seen:
            dropped["duplicate"] += 1
        else:
            if index is not None:
                signature = MinHash(num_perm=NUM_PERM, seed=1)
                for shingle in shingles(text):
                    signature.update(shingle.encode())
                if index.query(signature):
                    dropped["near_duplicate"] += 1
                    continue
                index.insert(item["id"], signature)
            seen.add(normalised(text))
            kept.append(item)
    return kept, dropped


def responses(items: Iterable[dict[str, Any]], filters: SynthFilters
              ) -> tuple[list[dict[str, Any]], Counter]:
    """(kept, dropped per reason). Each item: {id, response, finish_reason}."""
    dropped: Counter = Counter()
    is_excluded = excluded(filters.exclude_patterns)
    kept = []
    for item in items:
        text = item["response"]
        if not text.strip():
            dropped["empty"] += 1
        elif item.get("finish_reason") == "length":
            dropped["truncated"] += 1
        elif not filters.min_response_chars <= len(text) <= filters.max_response_chars:
            dropped["length"] += 1
        elif is_excluded(text):
            dropped["excluded"] += 1
        else:
            kept.append(item)
    return kept, dropped
