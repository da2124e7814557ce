"""Settings of `rlhfkit evaluate`: models compared on the same held-out prompts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhfkit.config.online import RewardSourceSettings
from rlhfkit.config.sections import (
    AnswerEngine,
    ChatDataSettings,
    ModelReference,
    SamplingSettings,
    Section,
    answer_engine_field,
    check_answer_engine_device,
)


class EvalSamplingSettings(SamplingSettings):
    max_new_tokens: int = Field(96, gt=0, description="Longest generated answer (the same for every model).")
    engine: AnswerEngine = answer_engine_field()


class RewardHackingThresholds(Section):
    length_ratio: float = Field(
        1.5, gt=1, description="Warn when a model's reward rose but its mean length is this many times the baseline's."
    )
    kl: float = Field(
        25.0,
        gt=0,
        description="Warn when a model's reward rose but its KL to the reference (nats per answer) exceeds this.",
    )
    distinct_ratio: float = Field(
        0.7, gt=0, le=1, description="Warn when distinct-2 falls below this fraction of the baseline's (collapse)."
    )


class EvaluateConfig(Section):
    """`rlhfkit evaluate`: compare models on the same held-out prompts with the same sampling."""

    models: dict[str, ModelReference] = Field(
        default_factory=lambda: {"base": "smollm2-135m-instruct"},
        description="Name -> model (built-in name, hub id, dir, adapter dir or run dir), in report order.",
    )
    baseline: str | None = Field(
        None, description="The model others are compared with (win rate); default: `sft` if named, else the first."
    )
    reference: str | None = Field(None, description="The model KL is measured to; default: the baseline.")
    reward_model: ModelReference | None = Field(
        None, description="Reward model (run dir, adapter or model) scoring every answer; none: no reward or win rate."
    )
    tie_margin: float = Field(
        0.0, ge=0, description="Reward differences at most this large count as ties (half a win)."
    )
    judges: dict[str, RewardSourceSettings] = Field(
        default_factory=dict,
        description="More judges scoring every answer (reward models, classifiers or Python functions): each model's "
        "mean score and win rate per judge; a judge a model was trained against (an RL stage's reward) is marked, "
        "its score not being held-out evidence.",
    )
    judge: str | None = Field(
        None,
        description="A local chat model judging each answer against the baseline's (asked in both orders): a second win rate.",
    )
    judge_tie_margin: float = Field(
        0.05, ge=0, lt=0.5, description="The judge's |P(better) − 0.5| up to this counts as a tie."
    )
    data: ChatDataSettings = Field(
        default_factory=ChatDataSettings,
        description="Held-out pairs: perplexity of their responses, ROUGE-L of answers against them.",
    )
    num_prompts: int = Field(24, ge=0, description="Held-out prompts answered by every model.")
    samples_per_prompt: int = Field(1, gt=0, description="Answers per prompt and model.")
    sampling: EvalSamplingSettings = Field(default_factory=EvalSamplingSettings)
    extra_prompts: list[str] = Field(
        default_factory=list, description="More prompts answered side by side (no references)."
    )
    max_prompt_length: int = Field(256, gt=1, description="Longest formatted prompt in tokens.")
    max_batches: int | None = Field(None, gt=0, description="Cap on held-out batches for perplexity.")
    batch_size: int = Field(8, gt=0, description="Held-out examples per perplexity batch.")
    loss_chunk_tokens: int = Field(1024, gt=0, description="Tokens per chunk when computing logits.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype for every model."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run.")
    warn: RewardHackingThresholds = Field(default_factory=RewardHackingThresholds)
    seed: int = Field(0, description="Seed of the held-out split (as in the SFT stage) and of sampling.")
    output_dir: str = Field("runs/evaluate", description="Where metrics.json and the side-by-side samples go.")

    @model_validator(mode="after")
    def _names(self) -> EvaluateConfig:
        if not self.models:
            raise ValueError("models: name at least one model")
        for name in self.judges:
            if not name or name == "reward_model":
                raise ValueError(f"judges: {name!r} cannot name a judge (non-empty, not 'reward_model')")
        for field in ("baseline", "reference"):
            value = getattr(self, field)
            if value is not None and value not in self.models:
                raise ValueError(f"{field}: {value!r} is not one of models ({', '.join(self.models)})")
        check_answer_engine_device("sampling", self.sampling.engine, self.device)
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or ("sft" if "sft" in self.models else next(iter(self.models)))

    @property
    def reference_name(self) -> str:
        return self.reference or self.baseline_name
