"""Config sections every stage shares: model, LoRA, data, training, evaluation, sampling.

Every field has a default and a one-line description. Validation runs in full before any model
or dataset is loaded: unknown keys, wrong types, impossible sizes and missing local files fail
at once with the field and the config file named.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from rlhfkit.errors import UserError
from rlhfkit.files import looks_like_local_path

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUILTIN_PREFIX = "builtin:"


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def user_path(value: str) -> Path:
    """The path with a leading ~ or ~user expanded; as written when there is no such user (`~0`)."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        return Path(value)


def existing_model_reference(value: str | None, info: ValidationInfo) -> str | None:
    """A model reference (built-in name, hub id, path) whose local path exists, or will: a pipeline
    validates every stage before the first runs, so earlier stages' outputs are pending then. A
    single-stage command run before the stage that writes its model is told which one that is."""
    if value is None or not looks_like_local_path(value) or user_path(value).exists():
        return value
    return _pending_output(value, value, info, "model path")


def _pending_output(value: str, directory: str, info: ValidationInfo, what: str) -> str:
    """`value`, when `directory` is an earlier pipeline stage's output (pending while the whole
    pipeline is validated); else an error naming the stage that writes it, or saying it is missing."""
    context = info.context or {}
    if directory in context.get("pipeline_outputs", ()):
        return value
    writer = context.get("written_by", {}).get(directory)
    if writer is not None:
        config_file = context.get("config_file", "CONFIG")
        raise ValueError(
            f"{value} does not exist yet: the {writer} stage writes it "
            f"(rlhfkit {writer} {config_file}, or all stages in order: rlhfkit pipeline {config_file})"
        )
    raise ValueError(f"{what} does not exist: {value}")


ModelReference = Annotated[str, AfterValidator(existing_model_reference)]


def existing_data_reference(value: str | None, info: ValidationInfo) -> str | None:
    """A data reference (builtin:NAME, hub name, path) whose local file exists, or will: a file in
    the directory of an earlier pipeline stage (the `label` stage's export) is pending until it runs."""
    if value is None or value.startswith(BUILTIN_PREFIX):
        return value
    looks_local = value.endswith(DATA_FILE_SUFFIXES) or value.startswith((".", "/", "~"))
    if not looks_local or user_path(value).exists():
        return value
    return _pending_output(value, str(Path(value).parent), info, "data file")


class ModelSettings(Section):
    name_or_path: ModelReference = Field(
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
        "sdpa",
        description="Attention kernel: sdpa attends packed sequences one at a time (fast); eager masks the packed row.",
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model (off: safer).")
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: hold the frozen base weights in 4-bit NF4 (bitsandbytes, CUDA GPUs); LoRA adapters train in model.dtype.",
    )

    @model_validator(mode="after")
    def _four_bit_on_a_gpu(self) -> ModelSettings:
        if self.load_in_4bit and self.device == "cpu":
            raise ValueError("model.load_in_4bit needs a CUDA GPU (bitsandbytes kernels), but model.device is cpu")
        return self


class LoraSettings(Section):
    enabled: bool = Field(True, description="Train LoRA adapters (true) or all weights (false).")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the output head."
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module (e.g. [q_proj, v_proj]) or 'all-linear'")
        return value


class DataSettings(Section):
    path: str = Field(
        ..., description="Data file (.jsonl/.json/.csv/.parquet), saved dataset dir, hub name or builtin:NAME."
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "saved", "hub"] = Field(
        "auto", description="How to read path; auto decides from the suffix or directory contents."
    )
    split: str = Field("train", description="Split to read from a hub or saved dataset.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns: {expected_name: name_in_your_data}, e.g. {prompt: question}."
    )
    mix: dict[str, float] = Field(
        default_factory=dict,
        description="More data (files, hub names, builtin:NAME) read like path and trained on with it: a list, or "
        "{source: weight} where weight 3 repeats the source's training rows three times and 0.5 keeps a seeded half. "
        "Each is split into train and held-out rows on its own; the reward stage reports held-out accuracy per source.",
    )
    eval_path: str | None = Field(None, description="Held-out data; if unset, eval_fraction of path is held out.")
    eval_split: str | None = Field(None, description="Split of eval_path (or of path) to evaluate on.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of rows held out when eval_path is unset.")
    max_examples: int | None = Field(None, gt=0, description="Use at most this many training rows.")
    part: str | None = Field(
        None,
        description="K/N: train on the K-th of N disjoint parts of the training rows; a row's part follows from its "
        "prompt alone (the same in every run and seed), e.g. a held-out judge's reward model on 2/2 and the "
        "training reward's on 1/2.",
    )
    max_length: int = Field(512, gt=1, description="Longest tokenised example (SFT) or block length (pretrain).")
    overlong: Literal["truncate", "skip", "error"] = Field(
        "truncate", description="What to do with an example longer than max_length."
    )
    invalid_rows: Literal["error", "skip"] = Field(
        "error", description="Empty or mistyped rows: stop with the row named, or skip and report a count."
    )

    @field_validator("part")
    @classmethod
    def _part_of_parts(cls, value: str | None) -> str | None:
        if value is None:
            return None
        index, _, count = value.partition("/")
        if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count) and int(count) >= 2):
            raise ValueError(f"write K/N with 1 ≤ K ≤ N and N ≥ 2 (e.g. 1/2), not {value!r}")
        return value

    @field_validator("path", "eval_path")
    @classmethod
    def _local_data_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        return existing_data_reference(value, info)

    @field_validator("mix", mode="before")
    @classmethod
    def _mix_as_weights(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if len(set(map(str, value))) < len(value):
            raise ValueError("a source is listed twice")
        return dict.fromkeys(value, 1.0)

    @field_validator("mix")
    @classmethod
    def _mixed_data_exists(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        for source, weight in value.items():
            existing_data_reference(source, info)
            if weight <= 0:
                raise ValueError(f"{source}: weight {weight:g} must be above 0 (leave the source out instead)")
        if info.data.get("path") in value:
            raise ValueError("path is listed twice (it is always trained on)")
        return value


class TextDataSettings(DataSettings):
    path: str = Field("builtin:tutor-corpus", description="Raw text data with a `text` column.")
    max_length: int = Field(
        256, gt=1, description="Block length: texts are concatenated and cut into blocks of this size."
    )


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
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW decoupled weight decay (not applied to biases and norms)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (β1, β2), each in [0, 1).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warmup from 0.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for data order, dropout and sampling.")
    save_every: int = Field(0, ge=0, description="Write a checkpoint every N optimizer steps (0: only at the end).")
    save_limit: int = Field(2, gt=0, description="Keep at most this many checkpoints.")
    log_every: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate held-out loss every N steps (0: before and after only).")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Where metrics go besides the console."
    )
    tracker_project: str = Field(
        "rlhfkit", min_length=1, description="Project (W&B) / experiment (MLflow) / log folder (TensorBoard) name."
    )
    loss_chunk_tokens: int = Field(
        1024, gt=0, description="Tokens per chunk when computing logits and the loss (bounds [tokens, vocab] memory)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    mixed_precision: Literal["no", "bf16", "auto"] = Field(
        "no",
        description="bf16: training passes multiply in bfloat16 (autocast) over float32 weights, the LM head and "
        "losses in float32; for CPUs with AMX/AVX512-BF16 and GPUs with bf16. auto: bf16 where it is one of those "
        "and the launch is not FSDP/DeepSpeed, else no.",
    )
    threads: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="CPU threads: auto follows the cores other processes leave free; N fixes it (bitwise-same training).",
    )
    on_nonfinite: Literal["error", "skip"] = Field(
        "error",
        description="A NaN/inf loss or gradient: stop naming the step (the last good checkpoint stays), or skip that batch's update and count it.",
    )

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        return "no" if value is False else value  # YAML reads a bare `no` as false


class EvalSettings(Section):
    before: bool = Field(True, description="Evaluate the starting model too, so the report shows what changed.")
    max_batches: int | None = Field(None, gt=0, description="Cap on held-out batches for perplexity.")


AnswerEngine = Literal["auto", "hf", "float32"]
ANSWER_ENGINES: tuple[str, ...] = get_args(AnswerEngine)


def check_answer_engine(engine: str) -> None:
    """Refuse an engine name outside AnswerEngine, for callers that take it as a plain string."""
    if engine not in ANSWER_ENGINES:
        raise UserError(f"engine must be one of {', '.join(ANSWER_ENGINES)}, got {engine!r}")


def answer_engine_field() -> Any:
    """The `engine` setting of everything that answers prompts outside RL rollouts (held-out
    answers, evaluation, feedback candidates): each engine samples the model's own distribution."""
    return Field(
        "auto",
        description="What samples the answers: float32 (rlhfkit's decode loop over the model's own float32 weights, "
        "LoRA merged, packed for oneDNN; Llama-layout models on the CPU), hf (transformers generate), or auto "
        "(float32 where it runs, else hf). Both sample the model's own distribution.",
    )


class GenerationSettings(Section):
    num_prompts: int = Field(16, ge=0, description="Held-out prompts answered for ROUGE-L and side-by-side samples.")
    max_new_tokens: int = Field(128, gt=0, description="Longest generated answer.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding (deterministic evaluation).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (when temperature > 0).")
    extra_prompts: list[str] = Field(
        default_factory=list, description="More prompts shown side by side (base vs tuned), without references."
    )
    engine: AnswerEngine = answer_engine_field()


class StageConfig(Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @model_validator(mode="after")
    def _four_bit_trains_adapters(self) -> StageConfig:
        if self.model.load_in_4bit and not self.lora.enabled:
            raise ValueError(
                "model.load_in_4bit freezes the base in 4 bits, so only adapters can train: set lora.enabled: true"
            )
        return self

    @model_validator(mode="after")
    def _answers_sampled_where_the_engine_runs(self) -> StageConfig:
        generation = getattr(self, "generation", None)
        if isinstance(generation, GenerationSettings):
            check_answer_engine_device("generation", generation.engine, self.model.device)
        return self


def check_answer_engine_device(section: str, engine: str, device: str) -> None:
    """Refuse the CPU answering engine for a model placed on a GPU."""
    if engine == "float32" and device not in ("auto", "cpu"):
        raise ValueError(f"{section}.engine float32 is a CPU sampler, but the model's device is {device}")


class SamplingSettings(Section):
    """How completions are sampled (RL rollouts, evaluation): always with T > 0, so KL is defined."""

    max_new_tokens: int = Field(64, gt=0, description="Longest completion; it must be able to reach an answer.")
    temperature: float = Field(
        0.7, gt=0, description="Sampling temperature; log-probs for the loss and KL use the same one."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0: no limit).")
    batch_size: int = Field(32, gt=0, description="Sequences per generate call.")


def field_entries(model: type[BaseModel], prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """(dotted name, field) of every value a config holds, sections walked in declaration order;
    `--help` and the generated config reference both read it."""
    entries = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            entries.extend(field_entries(annotation, f"{prefix}{name}."))
        else:
            entries.append((f"{prefix}{name}", info))
    return entries


def type_text(annotation: object) -> str:
    """A field's type as a reader writes it: `int | None`, `'cosine' | 'linear'`, `list[str]`."""
    origin, arguments = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(value) for value in arguments)
    if origin is Annotated:
        return type_text(arguments[0])
    if origin in (Union, UnionType):
        return " | ".join(type_text(argument) for argument in arguments)
    if origin is not None:
        inner = ", ".join(type_text(argument) for argument in arguments)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info: FieldInfo) -> str:
    return "required" if info.is_required() else repr(info.get_default(call_default_factory=True))


def dump_config(config: Section) -> str:
    """The resolved config as YAML, as written into the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
