"""One validated config model per stage, loaded from YAML with dotted ``--set`` overrides.

Every field has a default and a one-line description. Validation runs in full before any model
or dataset is loaded: unknown keys, wrong types, impossible sizes and missing local files fail
at once with the field and the config file named.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from rlhfkit.errors import ConfigError

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUILTIN_PREFIX = "builtin:"


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSettings(Section):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="Built-in model name, hub id, local model dir, .gguf file, adapter dir or run dir.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, when that is a dir.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype: auto = bf16 on GPUs that support it, else float32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train: auto picks a GPU if present.")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel: sdpa attends packed sequences one at a time (fast); eager masks the packed row."
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model (off: safer).")
    load_in_4bit: bool = Field(
        False, description="QLoRA: hold the frozen base weights in 4-bit NF4 (bitsandbytes, CUDA GPUs); LoRA adapters train in model.dtype."
    )

    @model_validator(mode="after")
    def _four_bit_on_a_gpu(self) -> "ModelSettings":
        if self.load_in_4bit and self.device == "cpu":
            raise ValueError("model.load_in_4bit needs a CUDA GPU (bitsandbytes kernels), but model.device is cpu")
        return self

    @field_validator("name_or_path")
    @classmethod
    def _model_path_exists(cls, value: str, info: ValidationInfo) -> str:
        # A pipeline validates every stage before the first runs: earlier stages' outputs are pending.
        pending = (info.context or {}).get("pipeline_outputs", ())
        looks_local = value.startswith((".", "/", "~")) or value.endswith(".gguf")
        if looks_local and value not in pending and not Path(value).expanduser().exists():
            raise ValueError(f"model path does not exist: {value}")
        return value


class LoraSettings(Section):
    enabled: bool = Field(True, description="Train LoRA adapters (true) or all weights (false).")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the output head."
    )


class DataSettings(Section):
    path: str = Field(..., description="Data file (.jsonl/.json/.csv/.parquet), saved dataset dir, hub name or builtin:NAME.")
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "saved", "hub"] = Field(
        "auto", description="How to read path; auto decides from the suffix or directory contents."
    )
    split: str = Field("train", description="Split to read from a hub or saved dataset.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns: {expected_name: name_in_your_data}, e.g. {prompt: question}."
    )
    eval_path: str | None = Field(None, description="Held-out data; if unset, eval_fraction of path is held out.")
    eval_split: str | None = Field(None, description="Split of eval_path (or of path) to evaluate on.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of rows held out when eval_path is unset.")
    max_examples: int | None = Field(None, gt=0, description="Use at most this many training rows.")
    max_length: int = Field(512, gt=1, description="Longest tokenised example (SFT) or block length (pretrain).")
    overlong: Literal["truncate", "skip", "error"] = Field(
        "truncate", description="What to do with an example longer than max_length."
    )
    invalid_rows: Literal["error", "skip"] = Field(
        "error", description="Empty or mistyped rows: stop with the row named, or skip and report a count."
    )

    @field_validator("path", "eval_path")
    @classmethod
    def _local_data_exists(cls, value: str | None) -> str | None:
        if value is None or value.startswith(BUILTIN_PREFIX):
            return value
        looks_local = value.endswith(DATA_FILE_SUFFIXES) or value.startswith((".", "/", "~"))
        if looks_local and not Path(value).expanduser().exists():
            raise ValueError(f"data file does not exist: {value}")
        return value


class TextDataSettings(DataSettings):
    path: str = Field("builtin:tutor-corpus", description="Raw text data with a `text` column.")
    max_length: int = Field(256, gt=1, description="Block length: texts are concatenated and cut into blocks of this size.")


class ChatDataSettings(DataSettings):
    path: str = Field("builtin:tutor-sft", description="prompt/completion rows, or chat `messages` rows.")
    template: Literal["auto", "plain"] = Field(
        "auto", description="auto: the tokenizer's chat template when it has one, else the plain template."
    )


class TrainSettings(Section):
    output_dir: str = Field("runs/default", description="Run directory: checkpoints, final model, metrics, logs.")
    epochs: int = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(8, gt=0, description="Examples (SFT) or blocks (pretrain) per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warmup from 0.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    seed: int = Field(0, description="Seed for data order, dropout and sampling.")
    save_every: int = Field(0, ge=0, description="Write a checkpoint every N optimizer steps (0: only at the end).")
    save_limit: int = Field(2, gt=0, description="Keep at most this many checkpoints.")
    log_every: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate held-out loss every N steps (0: before and after only).")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Where metrics go besides the console."
    )
    tracker_project: str = Field("rlhfkit", min_length=1, description="Project (W&B) / experiment (MLflow) / log folder (TensorBoard) name.")
    loss_chunk_tokens: int = Field(
        1024, gt=0, description="Tokens per chunk when computing logits and the loss (bounds [tokens, vocab] memory)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    on_nonfinite: Literal["error", "skip"] = Field(
        "error", description="A NaN/inf loss or gradient: stop naming the step (the last good checkpoint stays), or skip that batch's update and count it."
    )


class EvalSettings(Section):
    before: bool = Field(True, description="Evaluate the starting model too, so the report shows what changed.")
    max_batches: int | None = Field(None, gt=0, description="Cap on held-out batches for perplexity.")


class GenerationSettings(Section):
    num_prompts: int = Field(16, ge=0, description="Held-out prompts answered for ROUGE-L and side-by-side samples.")
    max_new_tokens: int = Field(128, gt=0, description="Longest generated answer.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding (deterministic evaluation).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (when temperature > 0).")
    extra_prompts: list[str] = Field(
        default_factory=list, description="More prompts shown side by side (base vs tuned), without references."
    )


class StageConfig(Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @model_validator(mode="after")
    def _four_bit_trains_adapters(self) -> "StageConfig":
        if self.model.load_in_4bit and not self.lora.enabled:
            raise ValueError("model.load_in_4bit freezes the base in 4 bits, so only adapters can train: set lora.enabled: true")
        return self


class PretrainConfig(StageConfig):
    """`rlhfkit pretrain`: continue causal-LM training on raw domain text."""

    data: TextDataSettings = Field(default_factory=TextDataSettings)


class SFTConfig(StageConfig):
    """`rlhfkit sft`: supervised fine-tuning on prompt -> response pairs, loss on responses only."""

    data: ChatDataSettings = Field(default_factory=ChatDataSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class PreferenceDataSettings(ChatDataSettings):
    path: str = Field("builtin:tutor-prefs", description="prompt/chosen/rejected rows, or chosen/rejected transcripts sharing a prompt.")
    max_length: int = Field(512, gt=3, description="Longest prompt+answer; the prompt loses its start first (final turns kept).")


class RewardLossSettings(Section):
    center_coef: float = Field(0.0, ge=0, description="η in + η (r_c + r_r)^2: keeps rewards centred on 0 (0 disables).")
    use_margins: bool = Field(True, description="Subtract a `margin` column from r_c - r_r when the data has one.")


class RewardConfig(StageConfig):
    """`rlhfkit reward`: a sequence-classification reward model trained with the Bradley-Terry loss."""

    data: PreferenceDataSettings = Field(default_factory=PreferenceDataSettings)
    loss: RewardLossSettings = Field(default_factory=RewardLossSettings)


class DPOSettings(Section):
    loss: Literal["sigmoid", "ipo", "simpo"] = Field("sigmoid", description="sigmoid = DPO (with label_smoothing: cDPO), ipo, or reference-free simpo.")
    beta: float = Field(0.1, gt=0, description="β: strength of the KL anchor to the reference (SimPO: reward scale).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: assumed label-flip rate (conservative DPO); sigmoid only.")
    simpo_gamma: float = Field(0.5, ge=0, description="γ: SimPO's target reward margin.")
    precompute_reference: bool = Field(False, description="Compute reference log-probs once before training instead of every step.")


class PreferenceEvalSettings(EvalSettings):
    reward_model: str | None = Field(None, description="Reward model (run dir, adapter or model) to score generated answers before/after.")


class DPOConfig(StageConfig):
    """`rlhfkit dpo`: direct preference optimisation of the policy on preference pairs."""

    data: PreferenceDataSettings = Field(default_factory=PreferenceDataSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    eval: PreferenceEvalSettings = Field(default_factory=PreferenceEvalSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


# ---- online RL: PPO, GRPO, TRPO -------------------------------------------------------


class PromptDataSettings(ChatDataSettings):
    path: str = Field("builtin:arithmetic", description="Prompts: a `prompt` column (text or chat messages); other columns go to reward functions.")
    max_length: int = Field(256, gt=1, description="Longest formatted prompt in tokens; longer prompts lose their start.")
    system_prompt: str | None = Field(None, description="A system message put before every prompt that has none (e.g. the answer format wanted).")


class SamplingSettings(Section):
    """How completions are sampled (RL rollouts, evaluation): always with T > 0, so KL is defined."""

    max_new_tokens: int = Field(64, gt=0, description="Longest completion; it must be able to reach an answer.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; log-probs for the loss and KL use the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0: no limit).")
    batch_size: int = Field(32, gt=0, description="Sequences per generate call.")


class RolloutSettings(SamplingSettings):
    prompts_per_step: int = Field(8, gt=0, description="Prompts sampled per RL step.")
    samples_per_prompt: int = Field(4, gt=0, description="Completions per prompt (GRPO's group size G; ≥ 2 for group baselines).")
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="Sampler: transformers' generate (CPU or GPU), or vLLM colocated on each process's GPU (weights loaded after each update)."
    )
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1, description="engine vllm: share of the GPU's memory vLLM takes (weights + KV cache); training has the rest.")
    vllm_sleep: bool = Field(True, description="engine vllm: release vLLM's GPU memory (KV cache dropped, weights to CPU) while the policy trains.")


class RewardSourceSettings(Section):
    function: str | None = Field(None, description="A Python reward: `module:function` or `path/to/file.py:function`.")
    model: str | None = Field(None, description="A reward model (run dir, adapter, model dir or hub id): its scalar output is the reward.")
    label: str | int | None = Field(None, description="For a classifier with several labels: the label (name or index) whose score is the reward.")
    output: Literal["logit", "probability"] = Field("logit", description="For a labelled classifier: that label's logit or softmax probability.")
    max_length: int = Field(512, gt=3, description="Longest prompt+completion the reward model reads.")
    missing_eos_penalty: float | None = Field(None, description="Subtract this from the reward of a completion that hit max_new_tokens without EOS.")
    on_invalid: Literal["error", "skip"] = Field("error", description="A reward that raises or is NaN/inf: stop naming the sample, or leave it out of the update (counted).")

    @model_validator(mode="after")
    def _one_source(self) -> "RewardSourceSettings":
        if (self.function is None) == (self.model is None):
            raise ValueError("set exactly one of reward.function and reward.model")
        return self


class RLEvalSettings(EvalSettings):
    num_prompts: int = Field(32, ge=0, description="Held-out prompts whose mean reward and KL are measured before and after.")
    samples_per_prompt: int = Field(2, gt=0, description="Completions per held-out prompt (same sampling settings as the rollouts).")
    seed: int = Field(1234, description="Sampling seed for evaluation, the same before and after.")


class PPOSettings(Section):
    epochs: int = Field(2, gt=0, description="Passes of PPO updates over each rollout batch.")
    minibatch_size: int | None = Field(None, gt=0, description="Sequences per optimizer step (default: the whole rollout batch).")
    clip: float = Field(0.2, gt=0, description="ε: policy-ratio clip range.")
    value_clip: float = Field(0.2, gt=0, description="ε_v: how far the value may move from its rollout-time value.")
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss beside the policy loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    kl_coef: float = Field(0.05, ge=0, description="β: per-token KL penalty coefficient (initial value when adaptive).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimate in the reward.")
    target_kl: float | None = Field(None, gt=0, description="Adapt β towards this KL per sequence (Ziegler et al.); null = fixed β.")
    kl_horizon: int = Field(10000, gt=0, description="Horizon of the adaptive KL controller, in samples.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 per rollout batch.")
    critic: Literal["model", "head"] = Field(
        "model", description="model: a value model with its own LoRA and head; head: a linear value head on the reference's frozen hidden states (no extra passes; for CPUs)."
    )
    critic_model: str | None = Field(None, description="critic: model starts from this model (e.g. the reward run); default: the policy's backbone.")


class GRPOSettings(Section):
    epochs: int = Field(1, gt=0, description="Passes over each rollout batch (1 = on-policy, ratio 1).")
    minibatch_size: int | None = Field(None, gt=0, description="Sequences per optimizer step (default: the whole rollout batch).")
    clip: float = Field(0.2, gt=0, description="ε: policy-ratio clip range.")
    beta: float = Field(0.04, ge=0, description="KL coefficient (k3 estimator) of the loss term to the reference; 0 drops the term (KL is still reported).")
    scale_rewards: bool = Field(True, description="Divide group advantages by the group's reward std (false: Dr. GRPO).")
    loss_aggregation: Literal["token", "sequence"] = Field("token", description="Average the loss over all tokens, or per sequence then over sequences.")


class TRPOSettings(Section):
    max_kl: float = Field(0.01, gt=0, description="δ: trust-region radius on the mean per-token KL(old ‖ new).")
    cg_iterations: int = Field(10, gt=0, description="Conjugate-gradient iterations for F⁻¹g.")
    cg_damping: float = Field(0.1, ge=0, description="Added to the Fisher diagonal: (F + λI) keeps CG stable.")
    line_search_steps: int = Field(10, gt=0, description="Backtracking halvings tried before rejecting the step.")
    fisher_samples: int = Field(16, gt=0, description="Sequences of the batch used for Fisher-vector products.")
    kl_check: Literal["batch", "fisher"] = Field(
        "batch",
        description="Where the line search measures the exact KL against δ: every response position of the batch "
        "(keeps positions × vocabulary float32 old distributions in memory), or only the Fisher sequences' positions.",
    )
    baseline: Literal["group", "value"] = Field("group", description="Advantages relative to the prompt's group mean, or from a critic with GAE.")
    value_epochs: int = Field(2, gt=0, description="Critic regression passes per step (baseline: value).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ (baseline: value).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ (baseline: value).")
    critic_model: str | None = Field(None, description="Start the critic from this model (baseline: value); default: the policy's backbone.")


class RLConfig(StageConfig):
    """Shared by the online RL stages: sample completions, score them, improve the policy."""

    data: PromptDataSettings = Field(default_factory=PromptDataSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    reward: RewardSourceSettings = Field(default_factory=lambda: RewardSourceSettings(function="rlhfkit.reward_functions:numeric_answer"))
    eval: RLEvalSettings = Field(default_factory=RLEvalSettings)
    train: TrainSettings = Field(default_factory=lambda: TrainSettings(lr=1e-5, warmup_ratio=0.0, scheduler="constant", max_steps=20))

    @model_validator(mode="after")
    def _vllm_on_a_gpu(self) -> "RLConfig":
        if self.rollout.engine == "vllm" and self.model.device == "cpu":
            raise ValueError("rollout.engine vllm needs a CUDA GPU, but model.device is cpu")
        return self


class PPOConfig(RLConfig):
    """`rlhfkit ppo`: PPO with a critic, GAE and a KL penalty to the reference policy."""

    ppo: PPOSettings = Field(default_factory=PPOSettings)


def _check_group_size(config: RLConfig, why: str) -> None:
    if config.rollout.samples_per_prompt < 2:
        raise ValueError(f"rollout.samples_per_prompt must be at least 2 for {why} (got {config.rollout.samples_per_prompt})")


class GRPOConfig(RLConfig):
    """`rlhfkit grpo`: group-relative policy optimisation (no critic)."""

    grpo: GRPOSettings = Field(default_factory=GRPOSettings)

    @model_validator(mode="after")
    def _groups(self) -> "GRPOConfig":
        _check_group_size(self, "group-relative advantages")
        return self


class TRPOConfig(RLConfig):
    """`rlhfkit trpo`: natural-gradient steps inside a KL trust region."""

    trpo: TRPOSettings = Field(default_factory=TRPOSettings)

    @model_validator(mode="after")
    def _groups(self) -> "TRPOConfig":
        if self.trpo.baseline == "group":
            _check_group_size(self, "the group baseline (or set trpo.baseline: value)")
        return self


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig,
    "ppo": PPOConfig, "grpo": GRPOConfig, "trpo": TRPOConfig,
}


# ---- evaluation across models, and the pipeline that chains the stages ----------------


class EvalSamplingSettings(SamplingSettings):
    max_new_tokens: int = Field(96, gt=0, description="Longest generated answer (the same for every model).")


class RewardHackingThresholds(Section):
    length_ratio: float = Field(1.5, gt=1, description="Warn when a model's reward rose but its mean length is this many times the baseline's.")
    kl: float = Field(25.0, gt=0, description="Warn when a model's reward rose but its KL to the reference (nats per answer) exceeds this.")
    distinct_ratio: float = Field(0.7, gt=0, le=1, description="Warn when distinct-2 falls below this fraction of the baseline's (collapse).")


class EvaluateConfig(Section):
    """`rlhfkit evaluate`: compare models on the same held-out prompts with the same sampling."""

    models: dict[str, str] = Field(
        default_factory=lambda: {"base": "smollm2-135m-instruct"},
        description="Name -> model (built-in name, hub id, dir, adapter dir or run dir), in report order.",
    )
    baseline: str | None = Field(None, description="The model others are compared with (win rate); default: `sft` if named, else the first.")
    reference: str | None = Field(None, description="The model KL is measured to; default: the baseline.")
    reward_model: str | None = Field(None, description="Reward model (run dir, adapter or model) scoring every answer; none: no reward or win rate.")
    tie_margin: float = Field(0.0, ge=0, description="Reward differences at most this large count as ties (half a win).")
    judge: str | None = Field(None, description="A local chat model judging each answer against the baseline's (asked in both orders): a second win rate.")
    judge_tie_margin: float = Field(0.05, ge=0, lt=0.5, description="The judge's |P(better) − 0.5| up to this counts as a tie.")
    data: ChatDataSettings = Field(default_factory=ChatDataSettings, description="Held-out pairs: perplexity of their responses, ROUGE-L of answers against them.")
    num_prompts: int = Field(24, ge=0, description="Held-out prompts answered by every model.")
    samples_per_prompt: int = Field(1, gt=0, description="Answers per prompt and model.")
    sampling: EvalSamplingSettings = Field(default_factory=EvalSamplingSettings)
    extra_prompts: list[str] = Field(default_factory=list, description="More prompts answered side by side (no references).")
    max_prompt_length: int = Field(256, gt=1, description="Longest formatted prompt in tokens.")
    max_batches: int | None = Field(None, gt=0, description="Cap on held-out batches for perplexity.")
    batch_size: int = Field(8, gt=0, description="Held-out examples per perplexity batch.")
    loss_chunk_tokens: int = Field(1024, gt=0, description="Tokens per chunk when computing logits.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weight dtype for every model.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run.")
    warn: RewardHackingThresholds = Field(default_factory=RewardHackingThresholds)
    seed: int = Field(0, description="Seed of the held-out split (as in the SFT stage) and of sampling.")
    output_dir: str = Field("runs/evaluate", description="Where metrics.json and the side-by-side samples go.")

    @model_validator(mode="after")
    def _names(self) -> "EvaluateConfig":
        if not self.models:
            raise ValueError("models: name at least one model")
        for field in ("baseline", "reference"):
            value = getattr(self, field)
            if value is not None and value not in self.models:
                raise ValueError(f"{field}: {value!r} is not one of models ({', '.join(self.models)})")
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or ("sft" if "sft" in self.models else next(iter(self.models)))

    @property
    def reference_name(self) -> str:
        return self.reference or self.baseline_name


POLICY_STAGES = ("pretrain", "sft")
ALIGNMENT_STAGES = ("dpo", "ppo", "grpo", "trpo")
PIPELINE_ORDER = (*POLICY_STAGES, "reward", *ALIGNMENT_STAGES, "evaluate")
CONFIG_CLASSES: dict[str, type[Section]] = {**STAGE_CONFIGS, "evaluate": EvaluateConfig}


class PipelineSettings(Section):
    """The `pipeline:` section: which stages run, from which model, into which run directory."""

    output_dir: str = Field("runs/pipeline", description="Run directory: one subdirectory per stage, plus the report.")
    model: str = Field("smollm2-135m-instruct", description="The starting (base) model of the first stage.")
    stages: list[Literal["pretrain", "sft", "reward", "dpo", "ppo", "grpo", "trpo", "evaluate"]] = Field(
        default_factory=lambda: ["pretrain", "sft", "reward", "ppo", "evaluate"], description="Stages to run, in this order."
    )

    @field_validator("stages")
    @classmethod
    def _order(cls, stages: list[str]) -> list[str]:
        if not stages:
            raise ValueError("name at least one stage")
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage is listed twice: {stages}")
        expected = [stage for stage in PIPELINE_ORDER if stage in stages]
        if stages != expected:
            raise ValueError(f"stages must run in the order {', '.join(PIPELINE_ORDER)} (got {', '.join(stages)})")
        return stages


def _set_default(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree[a][b] = value unless the user's config already sets it."""
    *sections, key = dotted.split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            return  # the user's value is not a section: validation will name it
    node.setdefault(key, value)


def chain_stage_tree(stage: str, tree: dict[str, Any], pipeline: PipelineSettings, sections: dict[str, Any]) -> dict[str, Any]:
    """A stage's config tree with what the pipeline implies filled in where the user left it unset.

    Each stage writes to OUTPUT_DIR/STAGE; pretrain starts from pipeline.model and every later stage
    from the last of pretrain/sft before it; RL stages are rewarded by the reward stage's model,
    DPO's answers are scored by it, and evaluate compares the base model, the SFT model (or the
    pretrained one when there is no SFT) and every aligned model.
    """
    tree = copy.deepcopy(tree)
    root = Path(pipeline.output_dir)
    earlier = pipeline.stages[: pipeline.stages.index(stage)] if stage in pipeline.stages else list(pipeline.stages)
    output = lambda name: str(root / name)  # noqa: E731
    policies = [name for name in earlier if name in POLICY_STAGES]
    start = output(policies[-1]) if policies else pipeline.model
    if stage == "evaluate":
        _set_default(tree, "output_dir", output(stage))
        # The base model, the last policy stage (SFT; pretrain when there is no SFT) and every aligned one.
        compared = policies[-1:] + [name for name in earlier if name in ALIGNMENT_STAGES]
        models = {"base": pipeline.model, **{name: output(name) for name in compared}}
        tree.setdefault("models", models)
        if "reward" in earlier:
            tree.setdefault("reward_model", output("reward"))
        sft_tree = sections.get("sft") if isinstance(sections.get("sft"), dict) else {}
        if "data" in sft_tree:
            tree.setdefault("data", sft_tree["data"])
        if isinstance(sft_tree.get("train"), dict) and "seed" in sft_tree["train"]:
            tree.setdefault("seed", sft_tree["train"]["seed"])
        return tree
    _set_default(tree, "train.output_dir", output(stage))
    _set_default(tree, "model.name_or_path", start)
    if "reward" in earlier:
        if stage in ("ppo", "grpo", "trpo"):
            reward = tree.setdefault("reward", {})
            if isinstance(reward, dict) and "function" not in reward and "model" not in reward:
                reward["model"] = output("reward")
        elif stage == "dpo":
            _set_default(tree, "eval.reward_model", output("reward"))
    return tree


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (1e-4, true, [a, b])."""
    key, sep, raw_value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; `rlhfkit STAGE --help` lists the sections)"
        elif "input" in item and not isinstance(item["input"], dict):
            message = f"{message} (got {item['input']!r})"
        lines.append(f"{source}: {field}: {message}")
    return "\n".join(lines)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}")
    try:
        loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path}: not UTF-8 text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _validate(config_class: type[Section], tree: dict[str, Any], source: str, pipeline: PipelineSettings | None = None) -> Any:
    outputs = {str(Path(pipeline.output_dir) / stage) for stage in pipeline.stages} if pipeline else set()
    try:
        return config_class.model_validate(tree, context={"pipeline_outputs": outputs})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def _pipeline_settings(loaded: dict[str, Any], source: str) -> PipelineSettings:
    section = loaded.get("pipeline")
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: pipeline: expected a section (output_dir, model, stages)")
    return _validate(PipelineSettings, section, f"{source} [pipeline]")


def load_config(stage: str, path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """Read a stage config from YAML (or defaults when path is None), apply overrides, validate it.

    In a multi-stage file each stage reads its own top-level section; when the file also has a
    `pipeline:` section, the stage's model and output paths follow the pipeline (chain_stage_tree).
    """
    config_class = CONFIG_CLASSES[stage]
    source = str(path) if path else "(defaults)"
    tree: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    if path is not None:
        loaded = _read_yaml(path)
        tree = loaded
        # A multi-stage file (configs/quickstart.yaml) keeps each stage under its own key.
        if isinstance(loaded.get(stage), dict) or "pipeline" in loaded:
            tree = copy.deepcopy(loaded.get(stage) or {})
            source = f"{source} [{stage}]"
    for assignment in overrides or []:
        apply_override(tree, assignment)
    pipeline = _pipeline_settings(loaded, str(path)) if "pipeline" in loaded else None
    if pipeline is not None:
        tree = chain_stage_tree(stage, tree, pipeline, loaded)
    return _validate(config_class, tree, source, pipeline)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineSettings, dict[str, Any]]:
    """The pipeline settings and every listed stage's validated config, before anything runs.

    Overrides name the stage first: `--set sft.train.lr=1e-4`, `--set pipeline.output_dir=runs/x`.
    """
    loaded = _read_yaml(path)
    for assignment in overrides or []:
        apply_override(loaded, assignment)
    loaded.setdefault("pipeline", {})
    pipeline = _pipeline_settings(loaded, str(path))
    unknown = sorted(set(loaded) - set(CONFIG_CLASSES) - {"pipeline"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level section(s) {', '.join(unknown)} (expected pipeline, {', '.join(CONFIG_CLASSES)})")
    configs = {}
    for stage in pipeline.stages:
        section = loaded.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path} [{stage}]: expected a section, got {type(section).__name__}")
        tree = chain_stage_tree(stage, section, pipeline, loaded)
        configs[stage] = _validate(CONFIG_CLASSES[stage], tree, f"{path} [{stage}]", pipeline)
    return pipeline, configs


def dump_config(config: StageConfig) -> str:
    """The resolved config as YAML, as written into the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
