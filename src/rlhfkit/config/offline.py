"""Settings of the offline stages: pretraining, SFT, the reward model, DPO and KTO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhfkit.config.sections import (
    ChatDataSettings,
    EvalSettings,
    GenerationSettings,
    ModelReference,
    Section,
    StageConfig,
    TextDataSettings,
)


class PretrainConfig(StageConfig):
    """`rlhfkit pretrain`: continue causal-LM training on raw domain text."""

    data: TextDataSettings = Field(default_factory=TextDataSettings)


class SFTConfig(StageConfig):
    """`rlhfkit sft`: supervised fine-tuning on prompt -> response pairs, loss on responses only."""

    data: ChatDataSettings = Field(default_factory=ChatDataSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class PreferenceDataSettings(ChatDataSettings):
    path: str = Field(
        "builtin:tutor-prefs",
        description="prompt/chosen/rejected rows, or chosen/rejected transcripts sharing a prompt.",
    )
    max_length: int = Field(
        512, gt=3, description="Longest prompt+answer; the prompt loses its start first (final turns kept)."
    )


class RewardDataSettings(PreferenceDataSettings):
    path: str = Field(
        "builtin:tutor-prefs",
        description="Preference rows (prompt/chosen/rejected, or transcripts sharing a prompt), or "
        "prompt/completion/label rows of answers labelled 👍/👎.",
    )


class RewardLossSettings(Section):
    objective: Literal["auto", "pairwise", "binary"] = Field(
        "auto",
        description="pairwise: Bradley-Terry on preference pairs; binary: logistic loss on answers labelled 👍/👎 "
        "(preference rows unpaired); auto: binary when the rows have a `label` column, else pairwise.",
    )
    center_coef: float = Field(
        0.0, ge=0, description="η in + η (r_c + r_r)^2: keeps rewards centred on 0 (0 disables)."
    )
    use_margins: bool = Field(True, description="Subtract a `margin` column from r_c - r_r when the data has one.")

    @model_validator(mode="after")
    def _settings_of_the_objective(self) -> RewardLossSettings:
        if self.objective == "binary" and self.center_coef:
            raise ValueError("loss.center_coef centres pairwise rewards; objective binary has no pairs")
        return self


class RewardConfig(StageConfig):
    """`rlhfkit reward`: a sequence-classification reward model, from preference pairs (Bradley-Terry)
    or from answers labelled 👍/👎 (pointwise, logistic)."""

    data: RewardDataSettings = Field(default_factory=RewardDataSettings)
    loss: RewardLossSettings = Field(default_factory=RewardLossSettings)


class DPOSettings(Section):
    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid",
        description="sigmoid = DPO (with label_smoothing: cDPO), ipo, or the reference-free simpo and orpo (SFT + odds ratio).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="β: strength of the KL anchor to the reference (SimPO: reward scale; ORPO: λ, the odds-ratio weight).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="ε: assumed label-flip rate (conservative DPO); sigmoid only."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="γ: SimPO's target reward margin.")
    precompute_reference: bool = Field(
        False, description="Compute reference log-probs once before training instead of every step."
    )

    @model_validator(mode="after")
    def _settings_of_the_chosen_loss(self) -> DPOSettings:
        if self.label_smoothing > 0 and self.loss != "sigmoid":
            raise ValueError(f"dpo.label_smoothing applies to loss: sigmoid (cDPO), not {self.loss}")
        if self.precompute_reference and self.loss in ("simpo", "orpo"):
            raise ValueError(f"dpo.precompute_reference: loss {self.loss} uses no reference model")
        return self


class PreferenceEvalSettings(EvalSettings):
    reward_model: ModelReference | None = Field(
        None, description="Reward model (run dir, adapter or model) to score generated answers before/after."
    )


class DPOConfig(StageConfig):
    """`rlhfkit dpo`: direct preference optimisation of the policy on preference pairs."""

    data: PreferenceDataSettings = Field(default_factory=PreferenceDataSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    eval: PreferenceEvalSettings = Field(default_factory=PreferenceEvalSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class FeedbackDataSettings(PreferenceDataSettings):
    path: str = Field(
        "builtin:tutor-prefs",
        description="prompt/completion/label rows (label true: 👍), or preference rows, each pair unpaired into 👍 and 👎.",
    )


class KTOSettings(Section):
    beta: float = Field(0.1, gt=0, description="β: sharpness of the value function around the reference point.")
    desirable_weight: float = Field(
        1.0, gt=0, description="λ_D: weight of desirable (👍) answers; aim for λ_D·n_D / (λ_U·n_U) in [1, 4/3]."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U: weight of undesirable (👎) answers.")


class KTOConfig(StageConfig):
    """`rlhfkit kto`: Kahneman-Tversky optimisation of the policy on answers labelled 👍 or 👎."""

    data: FeedbackDataSettings = Field(default_factory=FeedbackDataSettings)
    kto: KTOSettings = Field(default_factory=KTOSettings)
    eval: PreferenceEvalSettings = Field(default_factory=PreferenceEvalSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
