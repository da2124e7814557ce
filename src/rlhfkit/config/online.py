"""Settings of the online RL stages: PPO, GRPO and TRPO (rollouts, reward sources, each objective)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhfkit.config.sections import (
    ChatDataSettings,
    EvalSettings,
    ModelReference,
    SamplingSettings,
    Section,
    StageConfig,
    TrainSettings,
)


class PromptDataSettings(ChatDataSettings):
    path: str = Field(
        "builtin:arithmetic",
        description="Prompts: a `prompt` column (text or chat messages); other columns go to reward functions.",
    )
    max_length: int = Field(
        256, gt=1, description="Longest formatted prompt in tokens; longer prompts lose their start."
    )
    system_prompt: str | None = Field(
        None, description="A system message put before every prompt that has none (e.g. the answer format wanted)."
    )


class RolloutSettings(SamplingSettings):
    prompts_per_step: int = Field(8, gt=0, description="Prompts sampled per RL step.")
    samples_per_prompt: int = Field(
        4, gt=0, description="Completions per prompt (GRPO's group size G; ≥ 2 for group baselines)."
    )
    engine: Literal["hf", "vllm", "int8", "bf16", "float32", "auto"] = Field(
        "hf",
        description="Sampler: transformers' generate (CPU or GPU), vLLM colocated on each process's GPU (weights "
        "loaded after each update), or an int8, bf16 or float32 copy of the policy on the CPU (rebuilt after each "
        "update; its log-probs kept, sampler_kl logged; bf16 needs AVX512-BF16 or AMX; float32 is the policy's own "
        "distribution with its weights packed for oneDNN, faster where oneDNN beats the default BLAS); auto: bf16 "
        "where the CPU has those instructions and the run is not sharded, else hf.",
    )
    vllm_gpu_memory: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="engine vllm: share of the GPU's memory vLLM takes (weights + KV cache); training has the rest.",
    )
    vllm_sleep: bool = Field(
        True,
        description="engine vllm: release vLLM's GPU memory (KV cache dropped, weights to CPU) while the policy trains.",
    )
    correction: Literal["none", "tis", "mask_token", "mask_sequence"] = Field(
        "none",
        description="engine vllm, int8, bf16 or float32, grpo: weight the loss by the trainer/sampler probability ratio, truncated "
        "at correction_cap (tis), or drop tokens or completions whose ratio leaves [1/cap, cap] (off where auto picks hf).",
    )
    correction_cap: float = Field(2.0, gt=1, description="C of rollout.correction.")

    @model_validator(mode="after")
    def _a_separate_sampler(self) -> RolloutSettings:
        if self.correction != "none" and self.engine == "hf":
            raise ValueError(
                f"rollout.correction {self.correction} corrects for a separate sampler (rollout.engine: vllm, int8, bf16 "
                "or float32); "
                "with rollout.engine hf the training model samples itself and there is nothing to correct"
            )
        return self


class RewardSourceSettings(Section):
    function: str | None = Field(None, description="A Python reward: `module:function` or `path/to/file.py:function`.")
    model: ModelReference | None = Field(
        None, description="A reward model (run dir, adapter, model dir or hub id): its scalar output is the reward."
    )
    ensemble: list[ModelReference] = Field(
        default_factory=list,
        description="More reward models scored beside `model`, an ensemble combined by ensemble_objective; RL steps "
        "log the members' disagreement (their standard deviation) as reward_disagreement. Train the members alike "
        "(other data parts, lengths or backbones) so that their scales agree.",
    )
    ensemble_objective: Literal["mean", "worst_case", "uncertainty_weighted"] = Field(
        "mean",
        description="How the ensemble's scores combine (Coste et al. 2023): their mean, their minimum, or their mean "
        "less uncertainty_penalty times their variance.",
    )
    uncertainty_penalty: float = Field(
        1.0, ge=0.0, description="λ of uncertainty_weighted: the reward is the members' mean − λ · their variance."
    )
    label: str | int | None = Field(
        None, description="For a classifier with several labels: the label (name or index) whose score is the reward."
    )
    output: Literal["logit", "probability"] = Field(
        "logit", description="For a labelled classifier: that label's logit or softmax probability."
    )
    max_length: int = Field(512, gt=3, description="Longest prompt+completion the reward model reads.")
    missing_eos_penalty: float | None = Field(
        None, description="Subtract this from the reward of a completion that hit max_new_tokens without EOS."
    )
    on_invalid: Literal["error", "skip"] = Field(
        "error",
        description="A reward that raises or is NaN/inf: stop naming the sample, or leave it out of the update (counted).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardSourceSettings:
        if (self.function is None) == (self.model is None):
            raise ValueError("set exactly one of function and model")
        if self.ensemble and self.model is None:
            raise ValueError("ensemble: its reward models score beside `model`; set model to the first of them")
        if self.ensemble and self.label is not None:
            raise ValueError("ensemble: members are one-output reward models; label picks a classifier's output")
        if self.ensemble_objective != "mean" and not self.ensemble:
            raise ValueError(f"ensemble_objective {self.ensemble_objective!r} needs reward models listed in ensemble")
        return self


class RLEvalSettings(EvalSettings):
    num_prompts: int = Field(
        32, ge=0, description="Held-out prompts whose mean reward and KL are measured before and after."
    )
    samples_per_prompt: int = Field(
        2, gt=0, description="Completions per held-out prompt (same sampling settings as the rollouts)."
    )
    seed: int = Field(1234, description="Sampling seed for evaluation, the same before and after.")
    every: int = Field(
        0, ge=0, description="Also evaluate every N steps (0: before and after only): the held-out curves of training."
    )
    group_by: str | None = Field(
        None,
        description="A column of the prompt rows (e.g. `operation`): the held-out reward is also reported per "
        "value of it, before and after, with paired gains.",
    )
    greedy: bool = Field(
        False,
        description="Also answer each held-out prompt once greedily and report that answer's reward (the "
        "accuracy a user sees with deterministic decoding); KL still comes from the sampled answers.",
    )
    judges: dict[str, RewardSourceSettings] = Field(
        default_factory=dict,
        description="Held-out judges (reward models, classifiers or Python functions) the policy never trains "
        "against: they score the same held-out answers as the training reward, and a judge that falls while the "
        "training reward rises is reported as over-optimisation.",
    )

    @model_validator(mode="after")
    def _held_out_settings(self) -> RLEvalSettings:
        for name in self.judges:
            if not name or "/" in name or name == "reward":
                raise ValueError(f"eval.judges: {name!r} cannot name a judge (non-empty, no '/', not 'reward')")
        if self.group_by is not None and not self.group_by.strip():
            raise ValueError("eval.group_by: name a column of the prompt rows (or leave it out)")
        asked = [name for name in ("judges", "every", "group_by", "greedy") if getattr(self, name)]
        if asked and self.num_prompts == 0:
            what = f"eval.{asked[0]}"
            raise ValueError(f"{what} needs held-out prompts, but eval.num_prompts is 0")
        return self


class PPOSettings(Section):
    epochs: int = Field(2, gt=0, description="Passes of PPO updates over each rollout batch.")
    minibatch_size: int | None = Field(
        None, gt=0, description="Sequences per optimizer step (default: the whole rollout batch)."
    )
    clip: float = Field(0.2, gt=0, description="ε: policy-ratio clip range.")
    value_clip: float = Field(0.2, gt=0, description="ε_v: how far the value may move from its rollout-time value.")
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss beside the policy loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    kl_coef: float = Field(0.05, ge=0, description="β: per-token KL penalty coefficient (initial value when adaptive).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimate in the reward.")
    target_kl: float | None = Field(
        None, gt=0, description="Adapt β towards this KL per sequence (Ziegler et al.); null = fixed β."
    )
    kl_horizon: int = Field(10000, gt=0, description="Horizon of the adaptive KL controller, in samples.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 per rollout batch.")
    critic: Literal["model", "head"] = Field(
        "model",
        description="model: a value model with its own LoRA and head; head: a linear value head on the reference's "
        "frozen hidden states (no extra passes; for CPUs).",
    )
    critic_model: ModelReference | None = Field(
        None, description="critic: model starts from this model (e.g. the reward run); default: the policy's backbone."
    )


class GRPOSettings(Section):
    epochs: int = Field(1, gt=0, description="Passes over each rollout batch (1 = on-policy, ratio 1).")
    minibatch_size: int | None = Field(
        None, gt=0, description="Sequences per optimizer step (default: the whole rollout batch)."
    )
    clip: float = Field(0.2, gt=0, description="ε (ε_low): policy-ratio clip range, ratios below 1−ε are clipped.")
    clip_high: float | None = Field(
        None, gt=0, description="ε_high: ratios above 1+ε_high are clipped (DAPO's clip-higher: 0.28); default: clip."
    )
    beta: float = Field(
        0.04,
        ge=0,
        description="KL coefficient to the reference; 0 drops the penalty (KL is still reported).",
    )
    kl_penalty: Literal["loss", "reward"] = Field(
        "loss",
        description="loss: β·k3 as a loss term (GRPO); reward: −β·k1 in the reward (RLOO, REINFORCE++), per token for reinforce_pp.",
    )
    advantage: Literal["group", "rloo", "reinforce_pp", "reinforce_pp_group"] = Field(
        "group",
        description="group: reward relative to its group (GRPO); rloo: minus the mean of the others (RLOO); "
        "reinforce_pp: token returns normalised over the batch (REINFORCE++); reinforce_pp_group: with the group mean first.",
    )
    scale_rewards: bool = Field(
        True, description="Divide group advantages by the group's reward std (false: Dr. GRPO); advantage: group only."
    )
    importance_level: Literal["token", "sequence", "sequence_token", "sequence_sum"] = Field(
        "token",
        description="Importance ratio per token (GRPO), per completion (GSPO: exp of the mean log-ratio), GSPO-token, "
        "or the whole completion's likelihood ratio (RLOO's loss, with loss_aggregation: sequence).",
    )
    objective: Literal["clipped", "cispo"] = Field(
        "clipped",
        description="clipped: PPO's clipped surrogate; cispo: clipped, stop-gradient weights on log π (CISPO).",
    )
    cispo_max_weight: float = Field(5.0, gt=1, description="CISPO's cap ε_max on the importance weight (ScaleRL: 5).")
    loss_aggregation: Literal["token", "sequence", "constant"] = Field(
        "token",
        description="Average the loss over all tokens (DAPO), per sequence then over sequences (GRPO), or over "
        "completions × max_new_tokens (Dr. GRPO).",
    )
    dynamic_sampling: bool = Field(
        False, description="Leave groups whose rewards are all equal out of the update and its averages (DAPO)."
    )
    dynamic_sampling_rounds: int = Field(
        0,
        ge=0,
        description="dynamic_sampling: up to this many extra rounds of fresh prompts replace such groups first "
        "(DAPO re-samples until the batch is full); each process refills its own share.",
    )
    overlong_buffer: int | None = Field(
        None,
        gt=0,
        description="DAPO's soft overlong penalty: over the last this many tokens of max_new_tokens the reward "
        "falls linearly, to −overlong_penalty at the limit.",
    )
    overlong_penalty: float = Field(1.0, gt=0, description="The overlong penalty at max_new_tokens (overlong_buffer).")
    drop_truncated: bool = Field(
        False,
        description="Leave completions that hit max_new_tokens without EOS out of the update (DAPO's overlong filtering).",
    )


class TRPOSettings(Section):
    max_kl: float = Field(0.01, gt=0, description="δ: trust-region radius on the mean per-token KL(old ‖ new).")
    cg_iterations: int = Field(10, gt=0, description="Conjugate-gradient iterations for F⁻¹g.")
    cg_damping: float = Field(0.1, ge=0, description="Added to the Fisher diagonal: (F + λI) keeps CG stable.")
    line_search_steps: int = Field(10, gt=0, description="Backtracking halvings tried before rejecting the step.")
    fisher_samples: int = Field(16, gt=0, description="Sequences of the batch used for Fisher-vector products.")
    fisher_batch_size: int = Field(
        16,
        gt=0,
        description="Fisher sequences per forward pass of a Fisher-vector product. At fisher_samples or more, one "
        "forward serves every product; below, each product reruns the forward in passes of this many sequences "
        "(less memory, ~15% slower steps).",
    )
    kl_check: Literal["batch", "fisher"] = Field(
        "batch",
        description="Where the line search measures the exact KL against δ: every response position of the batch "
        "(a forward over the batch per try), or only the Fisher sequences' positions.",
    )
    baseline: Literal["group", "value"] = Field(
        "group", description="Advantages relative to the prompt's group mean, or from a critic with GAE."
    )
    value_epochs: int = Field(2, gt=0, description="Critic regression passes per step (baseline: value).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ (baseline: value).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ (baseline: value).")
    critic_model: ModelReference | None = Field(
        None, description="Start the critic from this model (baseline: value); default: the policy's backbone."
    )


class OnlineDPOSettings(Section):
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="The DPO-family loss on each step's pairs: sigmoid (DPO) or ipo."
    )
    beta: float = Field(0.1, gt=0, description="β: strength of the KL anchor to the reference (IPO's τ).")


class RLConfig(StageConfig):
    """Shared by the online RL stages: sample completions, score them, improve the policy."""

    data: PromptDataSettings = Field(default_factory=PromptDataSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    reward: RewardSourceSettings = Field(
        default_factory=lambda: RewardSourceSettings(function="rlhfkit.reward_functions:numeric_answer")
    )
    eval: RLEvalSettings = Field(default_factory=RLEvalSettings)
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(lr=1e-5, warmup_ratio=0.0, scheduler="constant", max_steps=20)
    )

    @model_validator(mode="after")
    def _engine_on_its_device(self) -> RLConfig:
        if self.rollout.engine == "vllm" and self.model.device == "cpu":
            raise ValueError("rollout.engine vllm needs a CUDA GPU, but model.device is cpu")
        if self.rollout.engine in ("int8", "bf16", "float32") and self.model.device not in ("auto", "cpu"):
            raise ValueError(
                f"rollout.engine {self.rollout.engine} is a CPU sampler, but model.device is {self.model.device}"
            )
        return self


class PPOConfig(RLConfig):
    """`rlhfkit ppo`: PPO with a critic, GAE and a KL penalty to the reference policy."""

    ppo: PPOSettings = Field(default_factory=PPOSettings)

    @model_validator(mode="after")
    def _no_correction(self) -> PPOConfig:
        _check_no_correction(self, "ppo")
        return self


def _check_no_correction(config: RLConfig, stage: str) -> None:
    if config.rollout.correction != "none":
        raise ValueError(f"rollout.correction is applied by the grpo stage; {stage} does not use it yet")


def _check_group_size(config: RLConfig, why: str) -> None:
    if config.rollout.samples_per_prompt < 2:
        raise ValueError(
            f"rollout.samples_per_prompt must be at least 2 for {why} (got {config.rollout.samples_per_prompt})"
        )


class GRPOConfig(RLConfig):
    """`rlhfkit grpo`: group-relative policy optimisation (no critic)."""

    grpo: GRPOSettings = Field(default_factory=GRPOSettings)

    @model_validator(mode="after")
    def _groups(self) -> GRPOConfig:
        settings = self.grpo
        _check_group_size(
            self,
            f"grpo.advantage {settings.advantage}" if settings.advantage != "group" else "group-relative advantages",
        )
        if settings.clip_high is not None and settings.clip_high < settings.clip:
            raise ValueError(
                f"grpo.clip_high ({settings.clip_high}) must be at least grpo.clip, ε_low ({settings.clip})"
            )
        if settings.objective == "cispo" and settings.clip_high is not None:
            raise ValueError(
                "grpo.clip_high clips PPO's surrogate; with grpo.objective cispo the weight cap is grpo.cispo_max_weight"
            )
        if not settings.scale_rewards and settings.advantage != "group":
            raise ValueError(f"grpo.scale_rewards applies to advantage: group, not {settings.advantage}")
        if settings.dynamic_sampling_rounds and not settings.dynamic_sampling:
            raise ValueError("grpo.dynamic_sampling_rounds re-samples for grpo.dynamic_sampling: set it to true")
        if settings.overlong_buffer is not None and settings.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(
                f"grpo.overlong_buffer ({settings.overlong_buffer}) must be at most rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens})"
            )
        return self


class TRPOConfig(RLConfig):
    """`rlhfkit trpo`: natural-gradient steps inside a KL trust region."""

    trpo: TRPOSettings = Field(default_factory=TRPOSettings)

    @model_validator(mode="after")
    def _groups(self) -> TRPOConfig:
        _check_no_correction(self, "trpo")
        if self.trpo.baseline == "group":
            _check_group_size(self, "the group baseline (or set trpo.baseline: value)")
        return self


class OnlineDPOConfig(RLConfig):
    """`rlhfkit online_dpo`: DPO on pairs the current policy samples and the reward labels, every step."""

    online_dpo: OnlineDPOSettings = Field(default_factory=OnlineDPOSettings)

    @model_validator(mode="after")
    def _pairs(self) -> OnlineDPOConfig:
        _check_no_correction(self, "online_dpo")
        _check_group_size(self, "a pair per prompt (its best and worst answers)")
        return self
