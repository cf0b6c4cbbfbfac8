"""lm-eval scores adapters unmerged, and scores prompt-tuned models correctly."""

from __future__ import annotations

import pytest
import torch

from conftest import lmalign, typed_config
from lmalign import models
from lmalign.evaluation import harness


def _prompt_tuned(tmp_path, cache):
    """A prompt-tuned tiny model saved as PEFT saves it, with virtual tokens that matter."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    config = typed_config(f"cache.build_dir={cache}")
    base = models.load_model(models.resolve(config.model, str(cache)), config.model,
                             config.hardware)
    torch.manual_seed(0)
    tuned = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                    num_virtual_tokens=VIRTUAL_TOKENS))
    with torch.no_grad():
        tuned.prompt_encoder["default"].embedding.weight.normal_(std=2.0)
    tuned.save_pretrained(tmp_path / "adapter")
    return config, tmp_path / "adapter"


VIRTUAL_TOKENS = 6


def _by_hand(model, tokenizer, context: str, continuation: str, offset: int) -> float:
    """log P(continuation | context) from the model's own forward pass, reading the logits
    `offset` positions in (PEFT puts the virtual tokens' positions first)."""
    stripped = context.rstrip()  # lm-eval scores trailing whitespace as part of the continuation
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits.log_softmax(-1)[0]
    assert log_probs.shape[0] == VIRTUAL_TOKENS + ids.shape[1]
    return sum(log_probs[offset + len(context_ids) + i - 1, token].item()
               for i, token in enumerate(continuation_ids))


def test_lm_eval_loglikelihood_of_a_prompt_tuned_model_matches_its_forward_pass(
        tmp_path, lmalign_cache):
    from lm_eval import simple_evaluate

    config, adapter = _prompt_tuned(tmp_path, lmalign_cache)
    model = models.load_trained(str(adapter), config.model, config.hardware)
    tokenizer = models.load_tokenizer(models.resolve(config.model, str(lmalign_cache)),
                                      config.model)
    results = simple_evaluate(model=harness.harness_model(model, tokenizer, batch_size=4),
                              tasks=["tiny_mc"], limit=3, log_samples=True,
                              apply_chat_template=True, task_manager=harness.task_manager(["tiny_mc"]))
    requests = [(args, response[0][0]) for sample in results["samples"]["tiny_mc"]
                for args, response in zip(sample["arguments"], sample["resps"])]
    assert len(requests) == 12  # 3 questions x 4 choices, batched with padding
    for (context, continuation), reported in requests:
        right = _by_hand(model, tokenizer, context, continuation, offset=VIRTUAL_TOKENS)
        misread = _by_hand(model, tokenizer, context, continuation, offset=0)
        assert abs(reported - right) < 1e-4, (context, continuation, reported, right)
        assert abs(reported - misread) > 1e-2  # the virtual positions matter to the score


@pytest.mark.slow  # a whole lmalign command with lm-eval's task scan
def test_a_generating_task_longer_than_the_models_context_is_one_line_with_the_fit(
        tmp_path, lmalign_cache):
    """lm-eval's gsm8k generates up to 256 tokens; the tiny model reads 256 positions."""
    command = ("stage=eval", "run_name=gsm", "eval.checkpoints=[base]",
               "eval.harness.tasks=[gsm8k_local]", "eval.harness.limit=1",
               "eval.harness.num_fewshot=0")
    result = lmalign(*command, cwd=tmp_path, cache=lmalign_cache)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert line == ("error: eval.harness.gen_kwargs.max_gen_toks=256: the tasks (gsm8k_local) "
                    "generate up to 256 tokens, but the model reads at most 256 positions, its "
                    "prompt included; allowed: fewer than 256 tokens to generate; fix: "
                    "+eval.harness.gen_kwargs.max_gen_toks=128")
    assert "Traceback" not in result.stderr
    fixed = lmalign(*command, "+eval.harness.gen_kwargs.max_gen_toks=128", cwd=tmp_path,
                    cache=lmalign_cache)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
