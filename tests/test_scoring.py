"""Reward scores in batches: sorted by length and padded, they equal each item scored alone, for
both input styles (chat template, and (question, answer) sentence pairs)."""

from __future__ import annotations

import pytest

from conftest import typed_config, write_pair_reward_model
from lmalign import models, scoring

PAIRS = [("Which is the largest: 3 8 1 5?", "The largest is 8."),
         ("Which is the smallest: 3 8 1 5? Answer with the digit only.", "1"),
         ("What is a digit?", "0, 1, 2, 3, 4, 5, 6, 7, 8 or 9: each of them is a digit."),
         ("Which is the largest: 9 0 2 4?", "9")]


def test_question_answer_pairs_score_as_the_tokenizers_sentence_pairs_one_by_one(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = write_pair_reward_model(tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert scoring.input_style(tokenizer) == "pair"
    batched = scoring.score(model, tokenizer, PAIRS, batch_size=3, max_length=64)
    with torch.inference_mode():
        alone = [model(**tokenizer(q, a, return_tensors="pt")).logits.item() for q, a in PAIRS]
    assert batched == pytest.approx(alone, abs=1e-5)
    # the second sentence's token type ids count: without them the scores differ
    encoded = scoring.encode(tokenizer, PAIRS[0], 64)
    assert set(encoded["token_type_ids"]) == {0, 1}


def test_a_long_pair_keeps_its_classification_token(tmp_path):
    path = write_pair_reward_model(tmp_path / "rm")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = scoring.encode(tokenizer, ("which is the largest " * 40, "the largest is 9 " * 40),
                             32)
    assert len(encoded["input_ids"]) == 32 and encoded["input_ids"][0] == tokenizer.cls_token_id


def test_a_reward_model_with_a_chat_template_reads_chats(lmalign_cache):
    tokenizer = models.load_tokenizer(models.resolve(typed_config().model, str(lmalign_cache)),
                                      typed_config().model)
    assert scoring.input_style(tokenizer) == "chat"
