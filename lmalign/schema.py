"""Typed schema of the composed config.

Hydra composes YAML from `conf/`; these dataclasses say what the result may hold. Values live in
the YAML files (one place per default); the schema holds types and fixed choices only, so a YAML
option that forgets a key is caught here too. `validate.py` turns every violation into one
`error:` line; library code receives these objects, never a DictConfig.

Over 400 lines on purpose: the whole config's shape, section by section in Config's order, is
read in one file.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid")

Stage = Literal["train_eval", "train", "eval", "merge", "watch", "report", "synthesize",
                "cache_plan", "cache_prepare", "cache_verify"]
Precision = Literal["fp32", "bf16", "fp16"]
# The one table between a precision and the torch dtype of the same width.
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DatasetFormat = Literal["messages", "prompt_completion", "preference", "text", "prompt",
                        "unpaired"]


# Bounds of the numbers users set (docs/design.md, Config tree): a value outside them is one
# error line naming the bound, before anything loads.
Count = Annotated[int, Field(ge=1)]  # steps, rows, processes, sizes: at least one
NonNegative = Annotated[int, Field(ge=0)]
PositiveNumber = Annotated[float, Field(gt=0)]
NonNegativeNumber = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # what numpy's generator accepts


def _one_or_more(value: Any) -> Any:
    """A single name where a list is expected is a list of one (eval.harness.tasks=tiny_mc)."""
    return [value] if isinstance(value, str) else value


Names = Annotated[list[str], BeforeValidator(_one_or_more)]


def precision_of(dtype: str) -> str:
    """model.dtype as a precision name ("auto" stays "auto")."""
    return {name: precision for precision, name in PRECISION_DTYPE.items()}.get(dtype, dtype)


@dataclass(config=STRICT)
class ModelConfig:
    name: str
    # embedded: built here from `architecture` and `seed`; pretrained: from_pretrained(name_or_path)
    source: Literal["embedded", "pretrained"]
    name_or_path: str
    revision: str | None
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None
    trust_remote_code: bool
    # Load the weights quantized (bitsandbytes) for QLoRA: only with method.peft=lora.
    quantization: Literal["none", "4bit", "8bit"]
    chat_template_path: str | None  # a Jinja file replacing the tokenizer's chat template
    eos_token: str | None
    # Start from an earlier run's final/ (its run_name under runs_root, or a path): full or adapter.
    init_from: str | None
    seed: Seed
    # The published architecture numbers (config.json keys): build on the meta device offline.
    architecture: dict[str, Any]
    published_params: Count | None


@dataclass(config=STRICT)
class DatasetConfig:
    name: str
    # tiny: the synthetic task; hub: load_dataset(path); local: a file or save_to_disk directory
    source: Literal["tiny", "hub", "local"]
    format: DatasetFormat
    path: str | None
    subset: str | None
    revision: str | None
    train_split: str
    eval_split: str | None
    # Rows for the eval split carved from the train split when the dataset has none (0 = none).
    eval_size: NonNegative
    # Canonical column -> column in the data, e.g. {messages: conversations}.
    columns: dict[str, str]
    # Keep only rows whose column equals the value, e.g. {label: true}.
    where: dict[str, Any]
    max_samples: Count | None
    max_eval_samples: Count | None
    seed: Seed
    # Preference pairs read as unpaired rows, each pair a desirable and an undesirable one
    # (format preference in the data, unpaired for the trainer: method=kto).
    unpair: bool
    # Format prompt: each text prompt (or a chat prompt's last user turn) written into this text at
    # {prompt}, e.g. "Question: {prompt}\nAnswer:" as lm-eval's gsm8k asks base models; other
    # {column} fields read the row's columns. null: prompts as they are.
    prompt_template: str | None
    # dataset=synthetic: a stage=synthesize run (run_name or directory); its sft/ is read for
    # format messages, its preferences/ for format preference. Set into `path` when the run starts.
    from_run: str | None


@dataclass(config=STRICT)
class DPOConfig:
    beta: PositiveNumber
    loss_type: str
    precompute_ref_log_probs: bool


@dataclass(config=STRICT)
class KTOSettings:
    beta: PositiveNumber
    loss_type: Literal["kto", "apo_zero_unpaired"]
    # Weights of the two kinds' losses, to balance unequal counts (TRL's advice: keep
    # desirable_weight x desirables / (undesirable_weight x undesirables) within 1 to 4/3).
    desirable_weight: PositiveNumber
    undesirable_weight: PositiveNumber


@dataclass(config=STRICT)
class RewardSettings:
    # TRL's auxiliary loss pulling mean rewards towards 0 (0.01 in the paper); null: off
    center_rewards_coefficient: NonNegativeNumber | None


@dataclass(config=STRICT)
class LoraSettings:
    r: Count
    alpha: Count
    dropout: Annotated[float, Field(ge=0, lt=1)]
    # PEFT's "all-linear" (every linear layer but the output head) or a list of module names.
    target_modules: str | list[str]


@dataclass(config=STRICT)
class PromptTuningSettings:
    num_virtual_tokens: Count
    init_text: str | None  # null: random initialisation


@dataclass(config=STRICT)
class SamplingSettings:
    """What GRPO and RLOO share, under TRL's names: how completions are sampled and logged."""
    num_generations: Annotated[int, Field(ge=2)]  # the group: completions sampled per prompt
    max_completion_length: Count  # tokens generated per completion
    temperature: PositiveNumber
    beta: NonNegativeNumber  # KL coefficient; 0 loads no reference model and logs no KL
    epsilon: PositiveNumber  # the ratio's clipping range
    # none: model.generate in the training process; colocate: vLLM in it (GPU); server: a
    # `trl vllm-serve` server at vllm_server_base_url (GPU).
    vllm_mode: Literal["none", "colocate", "server"]
    vllm_server_base_url: str | None
    # The prompt, completions, each reward and the advantage, every logging step, as parquet
    # files in the run's checkpoints/completions/.
    log_completions: bool


@dataclass(config=STRICT)
class GRPOSettings(SamplingSettings):
    """method=grpo: advantages against the group's mean (and spread)."""
    # TRL's names (luspo and vespo need settings lmalign does not expose)
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"]
    scale_rewards: Literal["group", "batch", "none"]


@dataclass(config=STRICT)
class RLOOSettings(SamplingSettings):
    """method=rloo: each completion's baseline is the mean of the others for its prompt; the
    KL term (beta) enters the reward."""
    normalize_advantages: bool


PeftKind = Literal["none", "lora", "prompt_tuning"]


@dataclass(config=STRICT)
class MethodConfig:
    _target_: str  # the function that trains it: build -> train -> save (lmalign/methods/)
    name: Literal["sft", "lora", "prompt_tuning", "dpo", "reward", "grpo", "rloo", "kto"]
    # Which weights train: all (none), a LoRA adapter, or prompt-tuning virtual tokens.
    peft: PeftKind
    lora: LoraSettings
    prompt_tuning: PromptTuningSettings
    learning_rate: PositiveNumber
    lr_scheduler_type: str
    warmup_ratio: Fraction
    weight_decay: NonNegativeNumber
    max_grad_norm: NonNegativeNumber  # 0: no clipping
    optim: str
    num_train_epochs: NonNegativeNumber
    max_steps: int  # -1: train num_train_epochs; otherwise at least 1 (checked in validate)
    # Rows per optimiser step; for method=grpo completions (TRL's counting): prompts per step are
    # global_batch_size / grpo.num_generations.
    global_batch_size: Count
    max_length: Count
    packing: bool
    # TRL's strategies: bfd and bfd_split pack padding-free (any attention: transformers 5 masks
    # by position_ids); wrapped does not.
    packing_strategy: Literal["bfd", "bfd_split", "wrapped"]
    padding_free: bool
    assistant_only_loss: bool | None  # null: on for chat data whose template marks replies
    completion_only_loss: bool | None
    logging_steps: Count
    save_steps: Count
    save_total_limit: Count | None
    eval_steps: Count | None
    # Preference methods only (method=dpo, method=reward); null for the others.
    dpo: DPOConfig | None
    reward: RewardSettings | None
    kto: KTOSettings | None  # method=kto only
    # Online methods only (method=grpo, method=rloo); null for the others.
    grpo: GRPOSettings | None
    rloo: RLOOSettings | None
    # Reward functions by name, each {_target_, weight, ...its settings} (lmalign/rewards.py);
    # an entry set to null is off. Checked in validate (imports, settings, weights).
    rewards: dict[str, dict[str, Any] | None] | None

    @property
    def needs_preferences(self) -> bool:
        return self.name in ("dpo", "reward")

    @property
    def needs_prompts(self) -> bool:
        """Generates its own completions from prompts (and scores them with method.rewards)."""
        return self.name in ("grpo", "rloo")

    @property
    def sampling(self) -> SamplingSettings | None:
        """The online method's block: group size, completion length, temperature, beta."""
        return {"grpo": self.grpo, "rloo": self.rloo}.get(self.name)

    @property
    def active_rewards(self) -> dict[str, dict[str, Any]]:
        return {name: spec for name, spec in (self.rewards or {}).items() if spec is not None}


@dataclass(config=STRICT)
class HardwareConfig:
    name: str
    accelerator: Literal["cpu", "cuda"]
    world_size: Count  # processes on all nodes together; the global batch divides by it
    num_nodes: Count
    node_rank: NonNegative | None  # null: SLURM_NODEID inside a SLURM job, else 0
    main_address: str | None  # null: the first node of the SLURM allocation, else 127.0.0.1
    main_port: Port | None  # null: free on one node; across nodes from the SLURM job id, else 29500
    per_device_batch_size: Count
    precision: Precision
    supports_bf16: bool  # false for GPUs without bf16 (T4, V100)
    gradient_checkpointing: bool
    liger_kernel: bool  # TRL's use_liger_kernel: fused RMSNorm, RoPE, SwiGLU and loss kernels
    torch_compile: bool  # transformers' torch_compile: the model through torch.compile (inductor)
    # The profile's attention, used where model.attn_implementation is null.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"]
    distributed: Literal["none", "ddp", "fsdp", "deepspeed"]
    launch_config: str | None  # accelerate config in launch/, for the distributed kinds
    dataloader_num_workers: NonNegative
    torch_threads: Count | None
    # Per device; the plan warns when its estimate exceeds it.
    device_memory_gib: PositiveNumber | None
    # What hydra/launcher=slurm asks for on each node (null: SLURM's default).
    cpus_per_node: Count | None
    memory_gib_per_node: Count | None
    time_limit_minutes: Count


@dataclass(config=STRICT)
class JudgeEndpoint:
    """The judge block both judging backends share (eval.judge and eval.nemo.judge): which model,
    where, and the NAME of the environment variable holding its API key; the key itself is never
    written anywhere."""

    model: str | None
    base_url: str | None  # an OpenAI-compatible base URL (.../v1)
    api_key_env: str | None
    # lmalign serves `model` (a hub id or a directory) itself; base_url and api_key_env are
    # then not used
    server: Literal["vllm", "sglang", "transformers"] | None
    server_startup_timeout_s: PositiveNumber
    extra: dict[str, Any]  # more request fields, e.g. reasoning_effort (reasoning models)


@dataclass(config=STRICT)
class JudgeConfig(JudgeEndpoint):
    """eval.nemo.judge: the judge of judge-based benchmarks (arena-hard, hle, ...); a null key
    keeps the benchmark's own default (arena-hard: gpt-4.1 at https://api.openai.com/v1).
    api_key_env null: NeMo-Skills' own lookup (OPENAI_API_KEY, NVIDIA_API_KEY)."""

    server_type: str | None  # NeMo-Skills' server types: openai, vllm, sglang, ...
    concurrency: Count | None  # judge requests in flight; null: NeMo-Skills' own (512)
    request_timeout_s: PositiveNumber | None  # null: NeMo-Skills' own (14400)
    # more arguments of NeMo-Skills' judge generation, e.g. a judge prompt for a benchmark
    # without its own: ['++prompt_config=judge/math', '++generation_key=judgement']
    args: list[str]

    @property
    def chosen(self) -> bool:
        """A judge is named: then every benchmark is judged, by it."""
        return bool(self.model or self.server_type or self.base_url or self.server)


@dataclass(config=STRICT)
class HarnessConfig:
    """eval.harness: lm-evaluation-harness tasks (conf/eval/harness.yaml)."""

    tasks: Names
    num_fewshot: NonNegative | list[NonNegative]
    # Documents per task: a count, or a fraction of each task in (0, 1].
    limit: Count | Annotated[float, Field(gt=0, le=1)] | None
    batch_size: Count
    apply_chat_template: bool
    # Few-shot examples as earlier chat turns; null: with the chat template, as lm-eval does.
    fewshot_as_multiturn: bool | None
    log_samples: bool
    gen_kwargs: dict[str, Any]

    @property
    def fewshot_values(self) -> list[int]:
        return self.num_fewshot if isinstance(self.num_fewshot, list) else [self.num_fewshot]

    @property
    def multiturn(self) -> bool:
        if self.fewshot_as_multiturn is None:
            return self.apply_chat_template
        return self.fewshot_as_multiturn


@dataclass(config=STRICT)
class NemoConfig:
    """eval.nemo: NeMo-Skills benchmarks through a managed inference server
    (conf/eval/nemo.yaml)."""

    # NeMo-Skills' names, :4 = 4 sampled runs: [gsm8k:4,ifeval], or its own "gsm8k:4,ifeval"
    benchmarks: str | list[str]
    server: Literal["vllm", "sglang", "transformers", "external"]
    server_address: str | None  # server=external: its OpenAI base URL (.../v1)
    server_startup_timeout_s: PositiveNumber
    nemo_env: str | None  # NeMo-Skills' own virtualenv (it pins datasets<4)
    inference: dict[str, Any]  # ++inference.<key>=<value>: temperature, top_p, ...
    nemo_args: list[str]  # more `ns eval` arguments, e.g. ['++max_samples=20']
    judge: JudgeConfig

    @property
    def benchmark_spec(self) -> str:
        """The benchmarks in NeMo-Skills' one-string form: gsm8k:4,ifeval."""
        if isinstance(self.benchmarks, list):
            return ",".join(str(b) for b in self.benchmarks)
        return self.benchmarks


@dataclass(config=STRICT)
class GenerateConfig:
    """eval.generate: answers for every checkpoint (conf/eval/generate.yaml)."""

    prompts: str  # mt_bench | ifeval | tiny | a prompts file or datasets directory
    # A file's columns mapped onto prompt, turns, id, category, reference: {prompt: question}
    columns: dict[str, str]
    max_prompts: Count | None  # the first N prompts of the set
    system_prompt: str | None
    num_samples: Count  # answers per prompt (and per turn)
    temperature: NonNegativeNumber  # 0: greedy (then one sample says all)
    top_p: Annotated[float, Field(gt=0, le=1)]
    max_new_tokens: Count
    batch_size: Count  # engine=hf: sequences per generate call
    # auto: vllm on a GPU profile where installed, else hf (batched generate in this process)
    engine: Literal["auto", "hf", "vllm", "sglang", "transformers", "external"]
    server_address: str | None  # engine=external: its OpenAI base URL (.../v1)
    server_startup_timeout_s: PositiveNumber
    api_key_env: str | None  # engine=external: the NAME of the variable holding its key
    concurrency: Count  # server engines: requests in flight
    max_retries: NonNegative  # server engines: the openai client's retries (429, 5xx, timeouts)
    request_timeout_s: PositiveNumber
    extra: dict[str, Any]  # more generate() arguments / request fields, e.g. repetition_penalty


@dataclass(config=STRICT)
class JudgeEvalConfig(JudgeEndpoint):
    """eval.judge: an LLM judge over eval.generate's answers (conf/eval/judge.yaml)."""

    rubric: str  # mt_bench | pairwise | answer_quality | a rubric YAML file
    # rubric=pairwise: the checkpoint every other one is compared with (base, final, ...), or
    # another run's: <run name or directory>/<checkpoint>
    baseline: str
    temperature: NonNegativeNumber
    max_tokens: Count  # the judge's own answer
    # auto: a JSON schema as response_format where the rubric answers in JSON and the endpoint
    # accepts it, else the answer is parsed | json_schema: always | none: never
    structured_output: Literal["auto", "json_schema", "none"]
    concurrency: Count  # judge requests in flight
    max_retries: NonNegative  # the openai client's retries (429 with Retry-After, 5xx, timeouts)
    request_timeout_s: PositiveNumber
    bootstrap_samples: Count  # resamples behind ci_low / ci_high (95%)


@dataclass(config=STRICT)
class RewardEvalConfig:
    """eval.reward: a reward model's pairwise accuracy on held-out pairs
    (conf/eval/reward.yaml)."""

    # null: the held-out split of the dataset the run trained on; else a preference file or
    # save_to_disk directory (prompt/chosen/rejected, or chosen/rejected with the prompt inside)
    pairs: str | None
    max_pairs: Count | None
    batch_size: Count
    max_length: Count  # longer pairs are cut from the left (the reply's end is what is scored)


BACKENDS = ("harness", "nemo", "generate", "judge", "reward")  # in the order a job evaluates them


@dataclass(config=STRICT)
class EvalConfig:
    """What every backend shares; each selected backend's block under its own key
    (`eval=harness`, `eval=nemo`, `'eval=[harness,nemo]'`; `eval=none` selects none)."""

    # base = the starting model; final = the trained model; latest / all / checkpoint-<step>;
    # one value or a list (a comma sweep of single values makes one job each)
    checkpoints: str | int | list[str | int]
    # Hub revisions of the model to evaluate, e.g. [step-125000, step-250000]: one load each.
    revisions: list[str]
    seed: Seed
    harness: HarnessConfig | None = None
    nemo: NemoConfig | None = None
    generate: GenerateConfig | None = None
    judge: JudgeEvalConfig | None = None
    reward: RewardEvalConfig | None = None

    @property
    def backends(self) -> list[str]:
        return [name for name in BACKENDS if getattr(self, name) is not None]

    @property
    def checkpoint_selectors(self) -> list[str]:
        chosen = self.checkpoints if isinstance(self.checkpoints, list) else [self.checkpoints]
        return [str(c) for c in chosen]


@dataclass(config=STRICT)
class SynthFilters:
    """What synthesis drops, each counted in the data card (conf/synth/magpie.yaml)."""

    min_instruction_chars: NonNegative
    max_instruction_chars: Count
    min_response_chars: NonNegative
    max_response_chars: Count
    # Instructions whose MinHash Jaccard similarity to an earlier one reaches this are
    # near-duplicates; null: exact duplicates only
    near_duplicate_threshold: Annotated[float, Field(gt=0, le=1)] | None
    exclude_patterns: list[str]  # regexes (case-insensitive): an instruction or reply matching one goes
    # Evaluation prompts no instruction may reproduce: named sets (gsm8k, ifeval, mt_bench, tiny)
    # or prompt files (a prompt or turns column), compared by word n-grams
    decontaminate: list[str]
    decontamination_ngram: Count  # a shared n-gram of this many words makes a prompt a candidate
    # an instruction reproducing this share of a candidate prompt's words (in order) is dropped
    decontamination_min_overlap: Annotated[float, Field(gt=0, le=1)]


@dataclass(config=STRICT)
class SynthConfig:
    """stage=synthesize: Magpie-style instructions, sampled responses, reward-model or judge scores,
    then SFT data and preference pairs in the run directory (conf/synth/)."""

    name: str
    # The instruct model writing instructions and responses: a run of ours (its final/), a model
    # directory or a hub id, resolved like model.init_from
    generator: str | None
    pre_query_template: str | None  # null: derived from the generator's chat template
    num_instructions: Count
    instruction_temperature: NonNegativeNumber
    instruction_top_p: Annotated[float, Field(gt=0, le=1)]
    instruction_max_new_tokens: Count
    responses_per_instruction: Annotated[int, Field(ge=2)]  # best and worst need two
    temperatures: Annotated[list[NonNegativeNumber], Field(min_length=1)]  # responses cycle
    response_top_p: Annotated[float, Field(gt=0, le=1)]
    response_max_new_tokens: Count
    batch_size: Count  # sequences per generate call, or requests per batch from a server
    # A batch that takes longer is stopped (transformers' max_time; a server's HTTP timeout),
    # retried once at half the size, then the stage stops with an error naming it, its work so
    # far kept
    batch_timeout_s: PositiveNumber
    # hf: batched generate in this process; a server engine serves the generator (as
    # eval.generate's do) or, external, is one you run at server_address
    engine: Literal["hf", "vllm", "sglang", "transformers", "external"]
    server_address: str | None  # engine=external: its OpenAI base URL (.../v1)
    server_startup_timeout_s: PositiveNumber
    api_key_env: str | None  # engine=external: the NAME of the variable holding its key
    concurrency: Count  # server engines: requests in flight
    filters: SynthFilters
    # reward_model: a sequence-classification model's score | judge: an LLM judge's rating
    # under a single or criteria rubric (the criteria's mean)
    scorer: Literal["reward_model", "judge"]
    judge: JudgeEvalConfig  # scorer=judge: eval.judge's block (conf/eval/judge.yaml)
    # A sequence-classification reward model: a method=reward run, a directory or a hub id
    reward_model: str | None
    # chat: the reward model's chat template (Skywork, ArmoRM, our method=reward runs); pair:
    # (question, answer) as a sentence pair (OpenAssistant's deberta); auto: pair where the reward
    # model has no chat template
    reward_input: Literal["auto", "chat", "pair"]
    reward_batch_size: Count
    reward_max_length: Count
    min_margin: NonNegativeNumber  # a pair's chosen score minus rejected at least this
    sft_top_fraction: Annotated[float, Field(gt=0, le=1)]  # the best-scored share of instructions
    seed: Seed


@dataclass(config=STRICT)
class LoggerConfig:
    name: Literal["none", "wandb", "tensorboard"]
    project: str | None
    # auto: online when logged in to W&B, offline otherwise (always works without network)
    mode: Literal["auto", "online", "offline"]


@dataclass(config=STRICT)
class ReportConfig:
    # stage=report collates this sweep or run directory; null: the run of run_name
    dir: str | None
    pack: bool  # also write results.zip: summaries, metrics, lm-eval results and samples, configs


@dataclass(config=STRICT)
class WatchConfig:
    poll_seconds: PositiveNumber
    # Give up when no new checkpoint appeared and training did not finish for this long.
    idle_timeout_minutes: PositiveNumber
    # null: evaluate here; a launcher option (slurm): each checkpoint is its own job there.
    submit_to: str | None


@dataclass(config=STRICT)
class CacheConfig:
    # The offline cache: hub models and datasets in the libraries' own layouts (hub/, datasets/)
    # and manifest.json, which lists what stage=cache_prepare fetched.
    dir: str | None
    # lmalign's own builds (the embedded model), which need no network.
    build_dir: str
    retries: NonNegative  # fetch attempts per item after the first
    pack: bool  # cache_prepare: also write <dir>.tar.gz with the manifest inside
    pack_part_gib: PositiveNumber | None  # split the pack into parts of at most this size


@dataclass(config=STRICT)
class Config:
    stage: Stage
    # Print the plan (batch split, parameters, starting point) and exit without loading weights.
    dry_run: bool
    run_name: str | None
    # The comparison recipe (conf/experiment/) a run is an arm of; names its arms' run_names.
    comparison: str | None
    runs_root: str
    resume: Literal["auto", "never"]
    seed: Seed
    # Run with the hub libraries' offline switches on, reading everything from cache.dir.
    offline: bool
    cache: CacheConfig
    # Environment variables the run needs but must never record (e.g. HF_TOKEN). Saved as ***.
    secrets: dict[str, str]
    model: ModelConfig
    dataset: DatasetConfig
    method: MethodConfig
    hardware: HardwareConfig
    eval: EvalConfig
    logger: LoggerConfig
    report: ReportConfig
    watch: WatchConfig
    synth: SynthConfig

    # What a stage does; the stage table in lmalign/run.py says which function runs it.
    @property
    def trains(self) -> bool:
        return self.stage in ("train_eval", "train")

    @property
    def evaluates(self) -> bool:
        return self.stage in ("train_eval", "eval") and bool(self.eval.backends)

    @property
    def loads_weights(self) -> bool:
        """Stages that load a model (checked against this machine and, offline, the cache)."""
        return self.stage in ("train_eval", "train", "eval", "merge", "synthesize")

    @property
    def gradient_accumulation(self) -> int:
        """Steps of accumulation that make the global batch from the processes' batches."""
        hardware = self.hardware
        return self.method.global_batch_size // (hardware.per_device_batch_size
                                                 * hardware.world_size)

    @property
    def reads_a_run(self) -> bool:
        """Stages that act on a run directory a training stage made (its recorded model)."""
        return self.stage in ("eval", "merge", "watch")
