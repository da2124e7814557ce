"""Settings of the `label` stage: the feedback-collection step of a pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rlhfkit.config.sections import (
    AnswerEngine,
    ModelReference,
    SamplingSettings,
    Section,
    answer_engine_field,
    existing_data_reference,
)


class LabelSamplingSettings(SamplingSettings):
    max_new_tokens: int = Field(128, gt=0, description="Longest candidate answer.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature of the candidates (varied answers).")
    engine: AnswerEngine = answer_engine_field()


class LabelJudgeSettings(Section):
    """An AI judge, so the pipeline runs unattended (RLAIF): exactly one of the three sources."""

    reward_model: ModelReference | None = Field(
        None,
        description="A reward model: the higher-scored answer of a pair wins; a single answer is 👍 above threshold.",
    )
    function: str | None = Field(
        None,
        description="A Python reward (`module:function`, the RL stages' signature) scoring answers as reward_model does.",
    )
    llm: ModelReference | None = Field(
        None, description="A local chat model asked which answer is better (both orders), or whether one is good."
    )
    tie_margin: float | None = Field(
        None, ge=0, description="Pairs: score differences up to this are ties (default 0; LLM: |P − 0.5| ≤ 0.05)."
    )
    threshold: float | None = Field(
        None, description="Single answers: 👍 above this score (default 0; LLM: P(Yes) > 0.5)."
    )
    name: str | None = Field(None, description="The judge's name in the store (default: its kind and reference).")

    @model_validator(mode="after")
    def _one_source(self) -> LabelJudgeSettings:
        given = [name for name in ("reward_model", "function", "llm") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one judge, not {' and '.join(given)}")
        return self

    @property
    def configured(self) -> bool:
        return any(getattr(self, name) is not None for name in ("reward_model", "function", "llm"))


class LabelPeopleSettings(Section):
    """People label on the web page while the pipeline waits."""

    annotators: list[str] = Field(
        default_factory=lambda: ["annotator"], description="Names of the people labelling; each gets a sign-in token."
    )
    host: str = Field("127.0.0.1", description="Where the labeling page listens (0.0.0.0 to share it on a network).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the labeling page.")
    wait_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop waiting after this long (labels are kept; re-run the pipeline to go on); none: until done.",
    )
    poll_seconds: float = Field(5.0, gt=0, description="How often the pipeline checks the store for new labels.")

    @model_validator(mode="after")
    def _someone(self) -> LabelPeopleSettings:
        if not self.annotators or any(not name.strip() for name in self.annotators):
            raise ValueError("people.annotators: name at least one annotator (no empty names)")
        if len(set(self.annotators)) != len(self.annotators):
            raise ValueError(f"people.annotators: a name is listed twice: {self.annotators}")
        return self


class LabelConfig(Section):
    """`rlhfkit label` as a pipeline stage: sample candidates from the model so far, have them
    labelled by people (waiting) or by a judge, and export what the next stages train on."""

    output_dir: str = Field("runs/label", description="Run directory: the store, the export, tokens, metrics.")
    model: ModelReference = Field(
        "smollm2-135m-instruct", description="The model whose answers are labelled (in a pipeline: the last policy)."
    )
    prompts: str = Field("builtin:tutor-sft", description="Prompt data (a `prompt` column), as for `label generate`.")
    num_prompts: int | None = Field(32, gt=0, description="Use the first N prompts (none: all).")
    kind: Literal["pairwise", "single"] = Field(
        "pairwise", description="pairwise: choose the better of two answers; single: 👍/👎 (and a 1-5 rating) on one."
    )
    responses: int = Field(2, gt=0, description="Answers per prompt (pairwise: consecutive ones are paired).")
    required: int = Field(1, gt=0, description="Labels each task needs before it is exported.")
    sampling: LabelSamplingSettings = Field(default_factory=LabelSamplingSettings)
    seed: int = Field(0, ge=0, description="Sampling seed of the candidates.")
    labeler: Literal["people", "judge"] = Field(
        "people",
        description="people: serve the page and wait for `required` labels; judge: label with `judge` and go on.",
    )
    judge: LabelJudgeSettings = Field(default_factory=LabelJudgeSettings)
    people: LabelPeopleSettings = Field(default_factory=LabelPeopleSettings)

    @field_validator("prompts")
    @classmethod
    def _prompts_exist(cls, value: str, info: ValidationInfo) -> str:
        return existing_data_reference(value, info)

    @model_validator(mode="after")
    def _labeler(self) -> LabelConfig:
        if self.labeler == "judge" and not self.judge.configured:
            raise ValueError("labeler judge: set one of judge.reward_model, judge.function or judge.llm")
        if self.kind == "pairwise" and self.responses < 2:
            raise ValueError("responses must be at least 2 for pairwise labels (a pair)")
        return self


def label_export_paths(output_dir: str | Path, kind: str) -> dict[str, Path]:
    """Where the label stage writes what later stages read: `preferences` (prompt/chosen/rejected
    rows: the majority choices, or for single answers each prompt's liked × disliked pairs) and, for
    single answers, `feedback` (prompt/completion/label rows)."""
    root = Path(output_dir).expanduser()
    if kind == "single":
        return {"feedback": root / "export.jsonl", "preferences": root / "pairs.jsonl"}
    return {"preferences": root / "export.jsonl"}
