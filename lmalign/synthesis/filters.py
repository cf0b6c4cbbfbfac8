"""What synthesis drops, step by step, with a count per reason for the data card.

Near-duplicates are found with datasketch's MinHash LSH over word 3-gram shingles: MinHash is
the standard estimate of Jaccard similarity for deduplicating generated text (the Magpie and
FineWeb pipelines use it), and LSH finds the candidates without comparing every pair, so a
million instructions cost seconds. The first of a group (in item order) is kept.

Decontamination follows the common two-step recipe (Phi-1, Cosmopedia, the Tulu 3 mixtures'
checks): a shared word n-gram (8 words by default) makes an evaluation prompt a candidate, and
the instruction is dropped when it reproduces at least `decontamination_min_overlap` of that
prompt's words in order (difflib's matching blocks). The second step keeps instructions that only
share boilerplate with IFEval-style constraints ("your entire response should be in English",
half the words of some IFEval prompts, which is why the default is 0.7, not Cosmopedia's 0.5);
an evaluation prompt shorter than n words (the tiny task's are 8) is a candidate when it appears
whole, which is a full match.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@dataclass
class Benchmarks:
    """Evaluation prompts indexed by their word n-grams (`contaminated` looks an instruction up)."""

    ngram: int
    min_overlap: float
    prompts: list[tuple[str, list[str]]] = field(default_factory=list)  # (set name, words)
    index: dict[tuple[str, ...], list[int]] = field(default_factory=dict)
    short_lengths: set[int] = field(default_factory=set)  # prompts under ngram words

    @classmethod
    def of(cls, sets: dict[str, list[str]], ngram: int, min_overlap: float) -> Benchmarks:
        found = cls(ngram, min_overlap)
        for name, texts in sets.items():
            for text in texts:
                tokens = words(text)
                if not tokens:
                    continue
                number = len(found.prompts)
                found.prompts.append((name, tokens))
                size = min(ngram, len(tokens))
                if size < ngram:
                    found.short_lengths.add(size)
                for gram in {tuple(tokens[i:i + size]) for i in range(len(tokens) - size + 1)}:
                    found.index.setdefault(gram, []).append(number)
        return found

    def contaminated(self, text: str) -> str | None:
        """The name of the set whose prompt the text reproduces, or None."""
        tokens = words(text)
        candidates: set[int] = set()
        for size in {self.ngram, *self.short_lengths}:
            for i in range(len(tokens) - size + 1):
                candidates.update(self.index.get(tuple(tokens[i:i + size]), ()))
        for number in sorted(candidates):
            name, prompt = self.prompts[number]
            matcher = difflib.SequenceMatcher(None, prompt, tokens, autojunk=False)
            matched = sum(block.size for block in matcher.get_matching_blocks())
            if matched / len(prompt) >= self.min_overlap:
                return name
        return None


def instructions(items: Iterable[dict[str, Any]], filters: SynthFilters,
                 benchmarks: Benchmarks | None = None) -> tuple[list[dict[str, Any]], Counter]:
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
        if reason is None and benchmarks is not None:
            found = benchmarks.contaminated(text)
            reason = f"contaminated ({found})" if found else None
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
