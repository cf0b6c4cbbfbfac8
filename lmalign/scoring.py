"""Scores from a reward model (a sequence-classification model with one output), in batches.

A conversation is rendered by the reward model's own chat template, as TRL's RewardTrainer
renders it in training (Skywork/ArmoRM-style models expect this); plain text gets the end-of-text
token TRL appends. Sequences longer than `max_length` lose their start: the model scores the
last token, so the reply's end must stay.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

Scored = list[dict[str, str]] | str  # a conversation, or plain text


def token_ids(tokenizer, item: Scored, max_length: int) -> list[int]:
    if isinstance(item, str):
        text = item if not tokenizer.eos_token or item.endswith(tokenizer.eos_token) \
            else item + tokenizer.eos_token
        ids = tokenizer(text)["input_ids"]
    else:
        ids = tokenizer.apply_chat_template(item, tokenize=True, return_dict=True)["input_ids"]
    return list(ids[-max_length:])


def prepare(loaded, tokenizer) -> None:
    """A sequence-classification model finds each sequence's last token by the pad id, which a
    causal LM's config (a run's base) does not carry."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    loaded.eval()


def score(loaded, tokenizer, items: list[Scored], batch_size: int, max_length: int,
          description: str = "scoring") -> list[float]:
    """One score per item, in order. Items are batched by length, so each batch pads little."""
    import torch
    from tqdm.auto import tqdm

    prepare(loaded, tokenizer)
    encoded = [token_ids(tokenizer, item, max_length) for item in items]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    found: list[float] = [0.0] * len(encoded)
    device = next(loaded.parameters()).device
    with tqdm(total=len(encoded), desc=description, unit="seq") as bar, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = _padded([encoded[i] for i in chosen], tokenizer.pad_token_id, device)
            logits = loaded(**batch).logits.float().view(-1)
            for index, value in zip(chosen, logits.tolist()):
                found[index] = value
            bar.update(len(chosen))
    return found


def _padded(sequences: list[list[int]], pad_id: int, device) -> dict[str, Any]:
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
