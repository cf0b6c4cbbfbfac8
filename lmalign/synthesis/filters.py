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
        reason = _unusable(text, item, filters.min_instruction_chars,
                           filters.max_instruction_chars, is_excluded)
        if reason is None and normalised(text) in seen:
            reason = "duplicate"
        if reason is None and index is not None:
            signature = MinHash(num_perm=NUM_PERM, seed=1)
            for shingle in shingles(text):
                signature.update(shingle.encode())
            if index.query(signature):
                reason = "near_duplicate"
            else:
                index.insert(item["id"], signature)
        if reason is not None:
            dropped[reason] += 1
            continue
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
        reason = _unusable(item["response"], item, filters.min_response_chars,
                           filters.max_response_chars, is_excluded)
        if reason is None:
            kept.append(item)
        else:
            dropped[reason] += 1
    return kept, dropped


def _unusable(text: str, item: dict[str, Any], shortest: int, longest: int,
              is_excluded: Callable[[str], bool]) -> str | None:
    """Why a generated text cannot be used at all, or None."""
    if not text.strip():
        return "empty"
    if item.get("finish_reason") == "length":
        return "truncated"
    if not shortest <= len(text) <= longest:
        return "length"
    if is_excluded(text):
        return "excluded"
    return None
