"""Scores from a reward model (a sequence-classification model with one output), in batches.

Two input styles are in use. A conversation is rendered by the reward model's own chat template,
as TRL's RewardTrainer renders it in training (Skywork/ArmoRM-style models expect this); plain
text gets the end-of-text token TRL appends; such sequences longer than `max_length` lose their
start, since the model scores the last token. A (question, answer) pair is the tokenizer's own
sentence pair (OpenAssistant's deberta reward models, BERT-style encoders: `[CLS] q [SEP] a
[SEP]` with token type ids), truncated longest-first as the tokenizer does, so the classification
token stays. `input_style` picks: a reward model without a chat template takes pairs.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

Scored = list[dict[str, str]] | str | tuple[str, str]  # a conversation, plain text, a pair


def input_style(tokenizer) -> str:
    """chat for a reward model with a chat template, pair (question, answer) for one without."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "pair"


def encode(tokenizer, item: Scored, max_length: int) -> dict[str, list[int]]:
    """input_ids (and token_type_ids where a sentence pair has them) of one item."""
    if isinstance(item, tuple):
        found = tokenizer(item[0], item[1], truncation="longest_first", max_length=max_length)
        return {key: list(found[key]) for key in ("input_ids", "token_type_ids") if key in found}
    if isinstance(item, str):
        text = item if not tokenizer.eos_token or item.endswith(tokenizer.eos_token) \
            else item + tokenizer.eos_token
        ids = tokenizer(text)["input_ids"]
    else:
        ids = tokenizer.apply_chat_template(item, tokenize=True, return_dict=True)["input_ids"]
    return {"input_ids": list(ids[-max_length:])}


def prepare(loaded, tokenizer) -> None:
    """A sequence-classification model finds each sequence's last token by the pad id, which a
    causal LM's config (a run's base) does not carry."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    loaded.eval()


def score(loaded, tokenizer, items: list[Scored], batch_size: int, max_length: int,
          description: str = "scoring", progress: bool = True) -> list[float]:
    """One score per item, in order. Items are batched by length, so each batch pads little.
    progress=False for scoring inside a training step, whose own bar already moves."""
    import torch
    from tqdm.auto import tqdm

    prepare(loaded, tokenizer)
    encoded = [encode(tokenizer, item, max_length) for item in items]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    found: list[float] = [0.0] * len(encoded)
    device = next(loaded.parameters()).device
    with tqdm(total=len(encoded), desc=description, unit="seq", disable=not progress) as bar, \
            torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = _padded([encoded[i] for i in chosen], tokenizer.pad_token_id, device)
            logits = loaded(**batch).logits.float().view(-1)
            for index, value in zip(chosen, logits.tolist()):
                found[index] = value
            bar.update(len(chosen))
    return found


def _padded(sequences: list[dict[str, list[int]]], pad_id: int, device) -> dict[str, Any]:
    """Right-padded: a causal reward model finds its last token by the pad id, an encoder reads
    its first."""
    import torch

    width = max(len(s["input_ids"]) for s in sequences)
    found = {key: torch.full((len(sequences), width), pad_id if key == "input_ids" else 0,
                             dtype=torch.long) for key in sequences[0]}
    found["attention_mask"] = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        size = len(sequence["input_ids"])
        for key, values in sequence.items():
            found[key][row, :size] = torch.tensor(values)
        found["attention_mask"][row, :size] = 1
    return {key: value.to(device) for key, value in found.items()}
