"""Each method trains what it should and nothing else: LoRA, prompt tuning, DPO, KTO, chained
runs."""

from __future__ import annotations

import dataclasses

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import lmalign, shared_path, typed_config
from lmalign import models
from lmalign.methods import dpo, sft

QUICK = ("eval=none", "dataset.max_samples=256", "dataset.max_eval_samples=32")


def _trainer(module, tmp_path, cache, *overrides):
    config = typed_config(*overrides, f"cache.build_dir={cache}", "method.logging_steps=1",
                          "method.eval_steps=null")
    return module.build(config, tmp_path, models.starting_point(config))


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before, model) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}


def test_lora_changes_only_the_adapter_and_leaves_base_weights_bit_identical(tmp_path, lmalign_cache):
    trainer = _trainer(sft, tmp_path, lmalign_cache, "method=lora", "method.max_steps=8",
                       *QUICK)
    before = _weights(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert changed and all("lora_" in name for name in changed)
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters()
                        if n in base)


@pytest.mark.slow  # trains: about 12 s
def test_prompt_tuning_changes_only_the_virtual_tokens_and_the_loss_falls(tmp_path, lmalign_cache):
    trainer = _trainer(sft, tmp_path, lmalign_cache, "method=prompt_tuning",
                       "method.max_steps=40", *QUICK)
    before = _weights(trainer.model)
    trainer.train()
    assert _changed(before, trainer.model) == {"prompt_encoder.default.embedding.weight"}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


@pytest.mark.slow  # trains: about 6 s
def test_dpo_with_lora_keeps_the_base_frozen(tmp_path, lmalign_cache):
    trainer = _trainer(dpo, tmp_path, lmalign_cache, "method=dpo", "dataset=tiny_prefs",
                       "method.peft=lora", "method.max_steps=4", *QUICK)
    before = _weights(trainer.model)
    trainer.train()
    changed = _changed(before, trainer.model)
    assert changed and all("lora_" in name for name in changed)


# ---------------------------------------------------------------------------------------------
# Whole runs, as a user types them.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("methods")


def _metric(run_dir: Path, checkpoint: str, task: str) -> float:
    import csv

    with open(run_dir / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["checkpoint"] == checkpoint
                and r["task"] == task and r["metric"] in ("acc", "exact_match")]
    assert len(rows) == 1, rows
    return float(rows[0]["value"])


@pytest.fixture(scope="module")
def lora_run(runs, lmalign_cache):
    result = lmalign("run_name=lora", "method=lora", "eval.harness.tasks=[tiny_mc]",
                     "method.max_steps=250", "method.eval_steps=null", cwd=runs,
                     cache=lmalign_cache, check=True)
    return runs / "runs" / "lora", result.stdout + result.stderr


@pytest.mark.slow
def test_lora_run_saves_a_small_adapter_that_beats_the_untrained_model(lora_run, lmalign_cache):
    run_dir, log = lora_run
    final = run_dir / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in final.iterdir()}
    assert not list(final.glob("model*.safetensors"))
    base = Path(json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"])
    ratio = (final / "adapter_model.safetensors").stat().st_size / \
        (base / "model.safetensors").stat().st_size
    assert ratio < 0.05
    assert _metric(run_dir, "final", "tiny_mc") > _metric(run_dir, "base", "tiny_mc") + 0.3
    assert "trainable of" in log


@pytest.mark.slow
def test_stage_merge_writes_a_full_model_equal_to_the_adapter(lora_run, runs, lmalign_cache):
    from transformers import AutoModelForCausalLM

    run_dir, _ = lora_run
    lmalign("run_name=lora", "method=lora", "stage=merge", cwd=runs, cache=lmalign_cache,
            check=True)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    config = typed_config("method=lora")
    adapter = models.load_trained(str(run_dir / "final"), config.model, config.hardware)
    ids = torch.tensor([[5, 80, 81, 82, 83, 84]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_dpo_on_a_lora_sft_adapter_continues_it_against_a_frozen_copy(lora_run, runs,
                                                                      lmalign_cache):
    result = lmalign("run_name=dpo_lora", "method=dpo", "dataset=tiny_prefs", "method.peft=lora",
                     "model.init_from=lora", "method.max_steps=10", *QUICK, cwd=runs,
                     cache=lmalign_cache, check=True)
    final = runs / "runs" / "dpo_lora" / "final"
    assert "continuing the lora adapter" in result.stdout + result.stderr
    assert (final / "adapter_model.safetensors").exists() and not (final / "ref").exists()


@pytest.fixture(scope="module")
def sft_run(default_run, runs, lmalign_cache):
    """The default SFT (the README's main job), copied here and scored on tiny_prefs."""
    shutil.copytree(default_run[1], runs / "runs" / "sft")
    lmalign("stage=eval", "run_name=sft", "eval.harness.tasks=[tiny_prefs]", cwd=runs,
            cache=lmalign_cache, check=True)
    return runs / "runs" / "sft"


@pytest.mark.slow
def test_dpo_after_sft_learns_the_preference_the_sft_data_ignored(sft_run, runs, lmalign_cache):
    """Scored by the policy's own log-likelihood on held-out pairs (lm-eval's tiny_prefs), not by
    TRL's reward accuracy."""
    result = lmalign("run_name=dpo", "method=dpo", "dataset=tiny_prefs", "model.init_from=sft",
                     "eval.harness.tasks=[tiny_prefs]", "method.eval_steps=null", cwd=runs,
                     cache=lmalign_cache, check=True)
    dpo_dir = runs / "runs" / "dpo"
    sft_score = _metric(sft_run, "final", "tiny_prefs")
    assert _metric(dpo_dir, "base", "tiny_prefs") == sft_score  # base = where DPO started
    assert 0.40 <= sft_score <= 0.70
    assert _metric(dpo_dir, "final", "tiny_prefs") >= sft_score + 0.15
    assert f"starting from {sft_run / 'final'}" in result.stdout + result.stderr
    assert (dpo_dir / "final" / "model.safetensors").exists()


@pytest.mark.slow  # about 30 s
def test_kto_on_labelled_replies_widens_the_held_out_margin_between_good_and_bad(tmp_path,
                                                                               lmalign_cache):
    """The held-out margin: the policy's log-ratio to the reference on desirable replies minus
    that on undesirable ones (TRL's eval_rewards/margins), 0 where training starts."""
    lmalign("run_name=kto", "method=kto", "dataset=tiny_unpaired", "dataset.max_eval_samples=64",
            "method.max_steps=40", "method.save_steps=40", "eval=none", cwd=tmp_path,
            cache=lmalign_cache, check=True)
    state = json.loads((tmp_path / "runs" / "kto" / "checkpoints" / "checkpoint-40" /
                        "trainer_state.json").read_text())
    margins = [h["eval_rewards/margins"] for h in state["log_history"]
               if "eval_rewards/margins" in h]
    assert len(margins) == 2 and 0 < margins[0] < margins[-1], margins
    assert (tmp_path / "runs" / "kto" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_dpo_runs_on_hh_rlhf_pairs_with_implicit_prompts(tmp_path, lmalign_cache):
    path = shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    lmalign("run_name=hh", "method=dpo", "dataset=local", f"dataset.path={path}",
            "dataset.format=preference", "dataset.max_samples=64", "method.max_steps=3",
            "method.max_length=256", "method.logging_steps=1", "eval=none", cwd=tmp_path,
            cache=lmalign_cache, check=True)
    state = json.loads((tmp_path / "runs" / "hh" / "checkpoints" / "checkpoint-3" /
                        "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]


@pytest.mark.slow
def test_qlora_trains_an_adapter_on_4bit_weights(tmp_path, lmalign_cache):
    result = lmalign("run_name=qlora", "method=lora", "model.quantization=4bit",
                     "method.max_steps=3", *QUICK, cwd=tmp_path, cache=lmalign_cache, check=True)
    final = tmp_path / "runs" / "qlora" / "final"
    assert (final / "adapter_model.safetensors").exists()
    assert not list(final.glob("model*.safetensors"))
    assert "trainable of" in result.stdout + result.stderr


@pytest.mark.slow
def test_stage_merge_refuses_a_run_without_a_lora_adapter(tmp_path, lmalign_cache):
    result = lmalign("run_name=nothing", "stage=merge", cwd=tmp_path, cache=lmalign_cache)
    assert result.returncode == 2
    assert "error: stage='merge': " in result.stderr and "holds no trained model" in result.stderr


PLAIN_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def test_a_template_without_generation_markers_falls_back_unless_asked_explicitly(
        tmp_path, lmalign_cache):
    from lmalign.errors import UserError
    from lmalign.methods.sft import _assistant_only_loss

    template = tmp_path / "plain.jinja"
    template.write_text(PLAIN_TEMPLATE)
    config = typed_config(f"model.chat_template_path={template}")
    tokenizer = models.load_tokenizer(models.resolve(config.model, str(lmalign_cache)),
                                      config.model)
    assert tokenizer.chat_template == PLAIN_TEMPLATE
    assert _assistant_only_loss(config, tokenizer) is False  # whole-conversation loss, logged
    explicit = typed_config(f"model.chat_template_path={template}",
                            "method.assistant_only_loss=true")
    with pytest.raises(UserError, match=r"method.assistant_only_loss=True: the chat template has "
                       r"no \{% generation %\} markers.*fix: model.chat_template_path="):
        _assistant_only_loss(explicit, tokenizer)


def _loss_curve(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_a_padding_free_row_keeps_its_sequences_apart_under_sdpa(architecture):
    """transformers 5 builds a block-diagonal mask from position_ids when a row comes without an
    attention mask (masking_utils.find_packed_sequence_indices): packed logits equal the
    separate sequences' logits, under sdpa and eager, through TRL's own collator."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    sequences = [[5, 9, 13, 2, 7, 7, 40], [3, 8, 21, 34, 55, 89, 14, 23, 37, 60, 97, 57], [4, 4, 6]]
    row = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": s} for s in sequences])
    assert "attention_mask" not in row and row["input_ids"].shape[0] == 1
    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        config = AutoConfig.for_model(architecture, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, vocab_size=128,
                                      attn_implementation=attention)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # use_cache=False as TRL's compute_loss: a cache turns it off
            packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"],
                           use_cache=False).logits[0]
            apart = torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits[0]
                               for s in sequences])
        assert (packed - apart).abs().max() < 1e-5, (architecture, attention)


def test_padding_free_training_follows_the_padded_loss_curve(tmp_path, lmalign_cache):
    """The same sequences per step, padded or flattened into one row (the same collator with
    padding_free on, as bfd packing uses it): the same losses, step after step."""
    def trainer(name, padding_free):
        built = _trainer(sft, tmp_path / name, lmalign_cache, "method.max_steps=8",
                         "method.save_steps=1000", *QUICK)
        built.data_collator = dataclasses.replace(built.data_collator, padding_free=padding_free)
        return built

    flat_trainer = trainer("flat", True)
    row = next(iter(flat_trainer.get_train_dataloader()))
    assert row["input_ids"].shape[0] == 1 and "attention_mask" not in row  # one padding-free row
    padded, flat = _loss_curve(trainer("padded", False)), _loss_curve(flat_trainer)
    assert len(padded) == len(flat) == 8
    assert max(abs(a - b) for a, b in zip(padded, flat)) < 1e-4, (padded, flat)
    assert padded[-1] < padded[0]  # it trained


def test_bfd_packing_trains_padding_free_rows_under_sdpa(tmp_path, lmalign_cache):
    trainer = _trainer(sft, tmp_path, lmalign_cache, "method.packing=true", "method.max_steps=2",
                       *QUICK)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = int((batch["position_ids"][0] == 0).sum())
    assert starts > 1  # several chats in the row, each from position 0
    trainer.train()


def test_wrapped_packing_trains(tmp_path, lmalign_cache):
    trainer = _trainer(sft, tmp_path, lmalign_cache, "method.packing=true",
                       "method.packing_strategy=wrapped", "method.max_steps=2", *QUICK)
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["input_ids"] == tokenizer.pad_token_id).float().mean() < 0.05
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    assert (batch["input_ids"] == user).sum() > len(batch["input_ids"])  # chats share rows
    trainer.train()


@pytest.mark.slow
def test_a_lora_adapter_answers_unmerged_and_stops(lora_run, runs, lmalign_cache):
    run_dir, _ = lora_run
    result = lmalign("run_name=lora", "method=lora", "stage=eval", "eval=generate",
                     "eval.generate.prompts=tiny", "eval.generate.max_prompts=8",
                     "eval.generate.max_new_tokens=40", "eval.checkpoints=[final]", cwd=runs,
                     cache=lmalign_cache, check=True)
    (cell,) = (run_dir / "eval" / "final").glob("generate-*")
    answers = [json.loads(line) for line in (cell / "generations.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and sum(a["finish_reason"] == "eos" for a in answers) >= 6
    assert "merging" not in result.stdout + result.stderr  # the adapter as loaded
