"""dry_run=true: what a run would do, printed without loading any weights.

Parameter counts come from the model built on PyTorch's meta device from its architecture numbers
(recorded in conf/model/ for hub models), with the method's PEFT wrapper applied, so the plan
works offline for models that were never downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lmalign import launch, memory, models
from lmalign.data import SYNTHESIZED_PARTS
from lmalign.schema import Config
from lmalign.tables import aligned


def describe(config: Config, run_dir: Path, submission: dict | None = None) -> str:
    """submission: the cluster launcher's resolved settings (hydra/launcher=slurm), if any."""
    method, hardware, dataset, model = config.method, config.hardware, config.dataset, config.model
    rows = [("run directory", str(run_dir)), ("stage", config.stage)]
    if submission:
        rows.append(("submits", ", ".join(
            f"{key} {value}" for key, value in submission.items()
            if value not in (None, {}, []) and key not in ("_target_", "submitit_folder",
                                                           "name", "stderr_to_stdout"))))
    if config.stage == "synthesize":
        return _table(rows + _synthesis_rows(config))
    source = (f"{model.name_or_path} @ {model.revision}" if model.source == "pretrained"
              else "embedded, built from its seed")
    rows.append(("model", f"{model.name} ({source})"))
    if config.offline:
        rows.append(("offline", f"models and datasets from {config.cache.dir} (the hub "
                     "libraries' offline switches on; checked against its manifest at start)"))
    start_note, architecture = _start(config)
    if start_note:
        rows.append(("starts from", start_note))
    meta = meta_model(config, architecture)
    trainable, total = models.count_parameters(meta)
    if config.stage not in ("train_eval", "train"):
        return _table(rows + _evaluation_rows(config, meta, total))
    share = f" ({100 * trainable / total:.2f}%)" if total else ""
    peft = {"none": "all weights", "lora": f"LoRA r={method.lora.r} alpha={method.lora.alpha} "
            f"on {method.lora.target_modules}", "prompt_tuning":
            f"{method.prompt_tuning.num_virtual_tokens} virtual tokens"}[method.peft]
    rows.append(("method", f"{method.name} ({peft}); quantization {model.quantization}"))
    rows.append(("parameters", f"{trainable:,} trainable of {total:,}{share}"))
    where = (f"{dataset.from_run}'s {SYNTHESIZED_PARTS.get(dataset.format, '?')}/"
             if dataset.from_run else dataset.path or "built in")
    if dataset.source == "local" and not dataset.from_run and dataset.path and not Path(
            str(dataset.path)).expanduser().exists():
        where += " (not found here: it must exist where the run starts)"
    rows.append(("dataset", f"{dataset.name} ({dataset.source}: {where}, "
                 f"format {dataset.format}"
                 + (" split into unpaired replies" if dataset.unpair else "")
                 + f", split {dataset.train_split})"
                 + (f"; prompts as {dataset.prompt_template!r}" if dataset.prompt_template
                    else "")))
    nodes = f" on {hardware.num_nodes} nodes" if hardware.num_nodes > 1 else ""
    rows.append(("batch", f"global {method.global_batch_size} = "
                 f"{hardware.per_device_batch_size} per device x {hardware.world_size} "
                 f"process(es){nodes} x {config.gradient_accumulation} accumulation"))
    if method.sampling is not None:
        sampling = method.sampling
        loss = f", loss {method.grpo.loss_type}" if method.grpo is not None else ""
        rows.append(("generation", f"{method.global_batch_size // sampling.num_generations} "
                     f"prompts per step x {sampling.num_generations} completions (the group), "
                     f"up to {sampling.max_completion_length} tokens, temperature "
                     f"{sampling.temperature:g}, "
                     + ("in the training process" if sampling.vllm_mode == "none" else
                        f"through vLLM ({sampling.vllm_mode})") + "; KL beta "
                     f"{sampling.beta:g}{loss}"))
        rows.append(("rewards", ", ".join(
            f"{name} {spec.get('weight', 1.0):g} x {spec['_target_']}"
            for name, spec in method.active_rewards.items())))
    length = (f"{method.max_steps} steps" if method.max_steps > 0
              else f"{method.num_train_epochs:g} epoch(s)")
    rows.append(("training", f"{length}, lr {method.learning_rate:g} {method.lr_scheduler_type}, "
                 f"max_length {method.max_length}, packing "
                 f"{method.packing_strategy if method.packing else 'off'}"))
    rows.append(("hardware", f"{hardware.name}: {hardware.accelerator}, {hardware.precision}, "
                 f"gradient checkpointing {_checkpointing(hardware)}, "
                 f"attention {models.attention(model, hardware, announce=False)}, "
                 f"distributed {hardware.distributed}"
                 + (", Liger kernels" if hardware.liger_kernel else "")
                 + (", torch.compile" if hardware.torch_compile else "")))
    rows += memory.describe(config, memory.estimate(config, meta))
    if launch.needs_workers(hardware):
        rows.append(("launch", launch.shell_command(
            hardware, launch.command(config, run_dir,
                                     Path(run_dir) / launch.HANDOFF_DIR / "<invocation>",
                                     _meeting(hardware)))))
    else:
        rows.append(("launch", "in this process"))
    rows += _eval_rows(config)
    return _table(rows)


def _eval_rows(config: Config) -> list[tuple[str, str]]:
    """One row per selected backend, then what they share: which checkpoints or revisions."""
    evaluation = config.eval
    rows = []
    if evaluation.nemo is not None:
        nemo = evaluation.nemo
        rows.append(("eval", f"nemo: NeMo-Skills {nemo.benchmark_spec} through a {nemo.server} "
                     f"server ({nemo.server_address or '127.0.0.1'}), inference {nemo.inference}"
                     + (f"; judge {nemo.judge.model or nemo.judge.base_url}"
                        + (f" on a {nemo.judge.server} server lmalign starts"
                           if nemo.judge.server else "") if nemo.judge.chosen else "")))
    if evaluation.harness is not None:
        harness = evaluation.harness
        rows.append(("eval", f"harness: {', '.join(harness.tasks)}; few-shot "
                     f"{harness.fewshot_values}"
                     + ("; per-sample logs" if harness.log_samples else "")))
    if evaluation.generate is not None:
        generate = evaluation.generate
        mode = f"temperature {generate.temperature}, top_p {generate.top_p}" \
            if generate.temperature > 0 else "greedy"
        rows.append(("eval", f"generate: {generate.prompts}"
                     + (f" (first {generate.max_prompts})" if generate.max_prompts else "")
                     + f" x {generate.num_samples} sample(s), {mode}, up to "
                     f"{generate.max_new_tokens} new tokens, {generate.engine} engine"))
    if evaluation.judge is not None and evaluation.generate is not None:
        from lmalign.evaluation import judge

        judged = evaluation.judge
        calls, tokens = judge.planned_calls(evaluation)
        where = f"a {judged.server} server lmalign starts" if judged.server else judged.base_url
        rows.append(("eval", f"judge: {judged.rubric} rubric by {judged.model} at "
                     f"{where}; per checkpoint {calls:,} judge request(s), about "
                     f"{tokens:,} input tokens and up to {calls * judged.max_tokens:,} output "
                     "tokens (none for judgments already cached)"))
    if evaluation.reward is not None:
        reward = evaluation.reward
        rows.append(("eval", "reward: pairwise accuracy on "
                     + (reward.pairs or f"the held-out pairs of dataset={config.dataset.name}")
                     + (f" (first {reward.max_pairs})" if reward.max_pairs else "")
                     + f", up to {reward.max_length} tokens per sequence"))
    if rows:
        rows.append(("evaluates", f"revisions {evaluation.revisions}" if evaluation.revisions
                     else f"checkpoints {evaluation.checkpoint_selectors}"))
    return sorted(rows, key=lambda row: row[0] != "eval" or not row[1].startswith("harness"))


def _synthesis_rows(config: Config) -> list[tuple[str, str]]:
    synth = config.synth
    responses = synth.num_instructions * synth.responses_per_instruction
    share = ("all" if synth.sft_top_fraction == 1
             else f"the best-scored {100 * synth.sft_top_fraction:g}%")
    return [
        ("generator", f"{synth.generator} (pre-query text "
         + ("given" if synth.pre_query_template else "from its chat template") + "; "
         + {"hf": "generated in this process",
            "external": f"asked at {synth.server_address}"}.get(
             synth.engine, f"served by {synth.engine}, {synth.concurrency} requests in flight")
         + ")"),
        ("instructions", f"{synth.num_instructions} at temperature "
         f"{synth.instruction_temperature}, up to {synth.instruction_max_new_tokens} new tokens"),
        ("responses", f"{synth.responses_per_instruction} per kept instruction at temperatures "
         f"{synth.temperatures} (at most {responses:,}), up to {synth.response_max_new_tokens} "
         f"new tokens; batches of {synth.batch_size}, {synth.batch_timeout_s:g} s deadline each"),
        ("scorer", f"judge {synth.judge.model} ({synth.judge.rubric} rubric, " + (
            f"served by {synth.judge.server})" if synth.judge.server else
            f"at {synth.judge.base_url})") if synth.scorer == "judge"
         else f"reward model {synth.reward_model}"),
        ("writes", f"sft/ (best answer, {share} of instructions), "
         f"preferences/ (best vs worst, margin >= {synth.min_margin:g}), synth.md"),
    ]


def _evaluation_rows(config: Config, meta, total: int) -> list[tuple[str, str]]:
    """Evaluation, watch and report stages: no training rows; the weights one load holds."""
    hardware = config.hardware
    rows = [("parameters", f"{total:,}"),
            ("hardware", f"{hardware.name}: {hardware.accelerator}, weights "
             f"{models.torch_dtype(config.model, hardware)}".replace("torch.", ""))]
    if config.eval.backends and config.stage != "report":
        rows.append(("memory", f"{memory.gib(memory.inference_weights(config, total))} of "
                     "weights per loaded model, before activations and lm-eval's batches"))
        targets = len(config.eval.revisions) or len(config.eval.checkpoint_selectors)
        rows += _eval_rows(config)
        if config.eval.harness is not None:
            rows.append(("cells", f"{targets} model(s) x "
                         f"{len(config.eval.harness.fewshot_values)} few-shot value(s), each "
                         "model loaded once"))
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    # A row whose key is "" continues the row above.
    return "\n".join(["plan (dry run: no weights loaded, nothing trained or recorded)",
                      *aligned(rows, indent="  ")])


def _checkpointing(hardware) -> str:
    if hardware.gradient_checkpointing:
        return "on"
    if hardware.distributed == "fsdp":
        from omegaconf import OmegaConf

        fsdp = OmegaConf.load(launch.launch_file(hardware)).get("fsdp_config", {})
        if fsdp.get("fsdp_activation_checkpointing"):
            return f"by FSDP ({hardware.launch_config})"
    return "off"


def _meeting(hardware) -> launch.Rendezvous:
    """The rendezvous as it would be; what only the node that runs it knows is a placeholder."""
    if hardware.num_nodes == 1 or launch.rendezvous_problems(hardware, os.environ):
        return launch.Rendezvous(
            hardware.num_nodes, hardware.node_rank if hardware.node_rank is not None else
            ("<node-rank>" if hardware.num_nodes > 1 else 0),
            hardware.main_address or ("<main-node>" if hardware.num_nodes > 1 else "127.0.0.1"),
            hardware.main_port or launch.MULTI_NODE_PORT)
    return launch.rendezvous(hardware)


def _start(config: Config) -> tuple[str | None, Path | None]:
    """(what the run starts from, a directory whose config.json gives the architecture)."""
    if not config.model.init_from:
        return None, None
    start = models.trained_start(config.model.init_from, config.runs_root)
    if start is None:
        return (f"{config.model.init_from} (not trained yet: its final/ must exist when this "
                "run starts)"), None
    if start.adapter is None:
        return f"{start.path} (full model)", Path(start.path)
    base = Path(start.path)
    return (f"{start.adapter} ({start.adapter_kind} adapter on {base})",
            base if (base / "config.json").exists() else None)


def meta_model(config: Config, architecture_dir: Path | None):
    """The run's model on the meta device with the method's PEFT wrapper (and a reward model's
    one-output head in place of the language-model head)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig

    from lmalign import training

    head = "reward" if config.method.name == "reward" else "causal_lm"
    if architecture_dir is not None:
        with torch.device("meta"):
            meta = models.auto_class(head).from_config(
                AutoConfig.from_pretrained(architecture_dir, **models.head_arguments(head)))
    else:
        meta = models.build_on_meta(config.model, head)
    method = config.method
    # Text initialisation needs the tokenizer; random initialisation trains the same parameters.
    method = dataclasses.replace(method, prompt_tuning=dataclasses.replace(
        method.prompt_tuning, init_text=None))
    peft_config = training.peft_config(method, tokenizer_path="")
    if peft_config is not None:
        meta = get_peft_model(meta, peft_config)
    return meta
