"""The Python API: every stage, the pipeline, loading, sampling and scoring, as functions.

    import rlhfkit

    sft = rlhfkit.sft(model="smollm2-135m-instruct", data=rows, output_dir="runs/sft", lora={"r": 16})
    rm = rlhfkit.reward(model=sft.path, data="prefs.jsonl", output_dir="runs/rm")
    ppo = rlhfkit.ppo(model=sft.path, reward=my_function, prompts=["..."], output_dir="runs/ppo")
    policy, tokenizer = rlhfkit.load(ppo.path)
    scores = rlhfkit.score(rm.path, prompts, responses)

A stage function takes the fields of its YAML config: a config file, a mapping or a config object
as the first argument, keyword sections laid over it (`train={"lr": 1e-4}`), and `overrides` in
the command line's `--set` form. It is validated exactly as the command line validates a file,
and bad input raises `rlhfkit.UserError` with the same one-line message. A few keywords take
Python objects: `model` a reference, `data` / `prompts` a path, a `datasets.Dataset`, a pandas
DataFrame or a list of rows, `reward` a callable, a reward-model reference or a reward section,
`output_dir` the run directory. The command line is a layer over these functions.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from rlhfkit import registry
from rlhfkit.config import Section
from rlhfkit.config.rounds import stage_of
from rlhfkit.errors import UserError

ConfigInput = str | os.PathLike[str] | Mapping[str, Any] | Section | None
Prompt = str | Sequence[dict[str, str]]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class StageResult:
    """What a stage run left: its run directory, its metrics and its validated config."""

    stage: str
    run_dir: Path
    metrics: dict[str, Any]
    config: Any

    @property
    def path(self) -> Path:
        """The model the run wrote (`final/`), for a later stage's `model=` or `rlhfkit.load`; an
        evaluation's run directory."""
        final = self.run_dir / "final"
        return final if registry.stage(stage_of(self.stage)).trains else self.run_dir


@dataclass(frozen=True)
class PipelineResult:
    """A pipeline run: its directory, the report, and each stage's result in pipeline order
    (`result["dpo"]`; with rounds, `result["dpo@2"]` for round 2)."""

    run_dir: Path
    report: Path
    stages: dict[str, StageResult]

    def __getitem__(self, stage: str) -> StageResult:
        return self.stages[stage]


def library_defaults() -> None:
    """Quiet what the libraries below say that tells an rlhfkit user nothing (once per process).

    Hugging Face's per-load bars ("Loading weights", "Writing model shards") go; rlhfkit's own
    bars (training, generation) are plain tqdm and stay. The environment variable reaches only
    libraries imported after it is set, so those already imported are told directly.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    # peft asks transformers' deprecated name on every LoRA model (transformers 5.x).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # peft looks for a config.json at the adapter's base reference; ours may be a run directory or a built-in name.
    warnings.filterwarnings("ignore", message="Could not find a config file in .*", category=UserWarning)


# --- config from Python objects ---------------------------------------------------------------


def _dataset_file(rows: Any, what: str) -> str:
    """Rows held in Python, written once as JSONL under a name derived from their content, so
    the same rows give the same path (a resumed run sees an unchanged config) and no file is
    ever overwritten."""
    from rlhfkit.files import json_text, write_text_atomically
    from rlhfkit.models import cache_dir

    if hasattr(rows, "column_names") and hasattr(rows, "to_list"):  # datasets.Dataset
        rows = rows.to_list()
    elif hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas.DataFrame
        rows = rows.to_dict(orient="records")
    elif hasattr(rows, "keys") and hasattr(rows, "column_names"):  # datasets.DatasetDict
        raise UserError(f"{what}: a DatasetDict holds several splits; pass one, e.g. dataset['train']")
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise UserError(
            f"{what}: expected a path, a datasets.Dataset, a pandas DataFrame or a list of rows, got {type(rows).__name__}"
        )
    if not rows:
        raise UserError(f"{what}: the list of rows is empty")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise UserError(f"{what}: row {number} is a {type(row).__name__}, expected a mapping of column -> value")
    text = "".join(json_text(dict(row)) + "\n" for row in rows)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
    target = cache_dir() / "datasets" / f"{digest}.jsonl"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(target, text)
    return str(target)


def _prompt_rows(prompts: Any) -> Any:
    """A list of prompts (texts or chat turns) as rows with a `prompt` column; rows stay rows."""
    if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        if prompts and all(isinstance(p, str) or _is_turn_list(p) for p in prompts):
            return [{"prompt": p if isinstance(p, str) else [dict(turn) for turn in p]} for p in prompts]
    return prompts


def _is_turn_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(t, Mapping) for t in value)


def _data_section(value: Any, what: str) -> Any:
    """A data section from a path, rows held in Python or a section mapping (whose `path` and
    `eval_path` may hold rows too)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return {"path": os.fspath(value)} if value is not None else None
    if isinstance(value, Mapping):
        section = dict(value)
        for key in ("path", "eval_path"):
            if section.get(key) is not None and not isinstance(section[key], str):
                section[key] = (
                    os.fspath(section[key])
                    if isinstance(section[key], os.PathLike)
                    else _dataset_file(section[key], f"{what}.{key}")
                )
        return section
    return {"path": _dataset_file(value, what)}


def _reward_section(value: Any) -> Any:
    """A reward section from a callable, a reward-model reference or a section mapping."""
    from rlhfkit.rewards import reward_function_spec

    if isinstance(value, (str, os.PathLike)):
        return {"model": os.fspath(value)}
    if isinstance(value, StageResult):
        return {"model": str(value.run_dir)}
    if callable(value):
        return {"function": reward_function_spec(value)}
    if isinstance(value, Mapping):
        section = dict(value)
        if callable(section.get("function")):
            section["function"] = reward_function_spec(section["function"])
        return section
    raise UserError(f"reward: expected a callable, a reward model reference or a mapping, got {type(value).__name__}")


def _model_reference(value: Any) -> Any:
    if isinstance(value, StageResult):
        return str(value.run_dir)
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def stage_fields(stage: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The config tree that a stage function's keywords stand for."""
    kind = registry.stage(stage).kind
    tree: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "model" and registry.stage(stage).trains:
            value = _model_reference(value)
            tree["model"] = {"name_or_path": value} if isinstance(value, str) else value
        elif key == "output_dir":
            continue  # below, once the train section is known
        elif key == "prompts" and kind == "feedback":  # the label stage: a path, or prompts held in Python
            value = _prompt_rows(value)
            tree["prompts"] = os.fspath(value) if isinstance(value, (str, os.PathLike)) else _dataset_file(value, key)
        elif key in ("data", "prompts"):
            if key == "prompts" and kind != "online":
                raise UserError(f"rlhfkit.{stage}(): `prompts` is for the RL stages; pass `data`")
            tree["data"] = _data_section(_prompt_rows(value) if key == "prompts" else value, key)
        elif key == "reward" and kind == "online":
            tree["reward"] = _reward_section(value)
        elif key == "models" and isinstance(value, Mapping):
            tree["models"] = {name: _model_reference(reference) for name, reference in value.items()}
        elif key == "reward_model":
            tree["reward_model"] = _model_reference(value)
        elif isinstance(value, Section):
            tree[key] = value.model_dump(mode="json")
        else:
            tree[key] = value
    if "output_dir" in fields:
        output_dir = os.fspath(fields["output_dir"])
        if registry.stage(stage).trains:
            tree["train"] = {**dict(tree.get("train") or {}), "output_dir": output_dir}
        else:
            tree["output_dir"] = output_dir
    return tree


def stage_config(
    stage: str,
    config: ConfigInput = None,
    overrides: Sequence[str] | None = None,
    fields: Mapping[str, Any] | None = None,
    where: str | None = None,
) -> Any:
    """A stage's validated config, from a file, a mapping or a config object, with the keyword
    fields laid over it and `--set`-style overrides applied last. Errors name `where` the config
    came from (default: the file, or `rlhfkit.STAGE()`)."""
    from rlhfkit.config.loading import load_config

    if stage not in registry.STAGES:
        raise UserError(f"unknown stage {stage!r} (the stages are {', '.join(registry.names())})")
    if isinstance(config, Section):
        config = config.model_dump(mode="json")
    source = os.fspath(config) if isinstance(config, os.PathLike) else config
    if source is None and where is None:
        source = {}  # named after the function, not "(defaults)"
    tree = stage_fields(stage, fields or {})
    return load_config(stage, source, list(overrides or []), tree, where or f"rlhfkit.{stage}()")


def run_stage(stage: str, config: Any, resume: bool = False) -> StageResult:
    """Run one stage on a validated config (from `stage_config`)."""
    from rlhfkit.engine import leave_process_group

    library_defaults()
    entry = registry.stage(stage)
    metrics = entry.runner(config, resume=resume)
    leave_process_group()
    return StageResult(stage, entry.output_dir(config), dict(metrics or {}), config)


def _run(stage: str, config: ConfigInput, resume: bool, overrides: Sequence[str] | None, fields: Any) -> StageResult:
    return run_stage(stage, stage_config(stage, config, overrides, fields), resume)


# --- the stages (one function each, named as in the registry and the command line) -----------


def pretrain(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """Continue causal-LM training on raw text (`data`: rows with a `text` column)."""
    return _run("pretrain", config, resume, overrides, fields)


def sft(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """Supervised fine-tuning (`data`: prompt/completion or chat `messages` rows)."""
    return _run("sft", config, resume, overrides, fields)


def label(config: ConfigInput = None, /, *, overrides: Sequence[str] | None = None, **fields: Any) -> StageResult:
    """Sample answers from `model` and label them by `judge` or by people (`labeler="people"`, waiting); export."""
    return _run("label", config, False, overrides, fields)


def reward(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """A Bradley-Terry reward model (`data`: prompt/chosen/rejected rows, e.g. a labeled export)."""
    return _run("reward", config, resume, overrides, fields)


def dpo(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """DPO and its family (`dpo={"loss": "ipo"}`) on prompt/chosen/rejected rows."""
    return _run("dpo", config, resume, overrides, fields)


def kto(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """KTO on answers labelled 👍 / 👎 (`data`: prompt/completion/label rows, or preference rows)."""
    return _run("kto", config, resume, overrides, fields)


def ppo(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """PPO with a critic (`prompts`, and `reward`: a callable, a reward-model run or a section)."""
    return _run("ppo", config, resume, overrides, fields)


def grpo(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """GRPO and the critic-free family (`grpo={"advantage": "rloo"}`): `prompts` and `reward` as for ppo."""
    return _run("grpo", config, resume, overrides, fields)


def trpo(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """TRPO: natural-gradient steps in a KL trust region; `prompts` and `reward` as for ppo."""
    return _run("trpo", config, resume, overrides, fields)


def online_dpo(
    config: ConfigInput = None, /, *, resume: bool = False, overrides: Sequence[str] | None = None, **fields: Any
) -> StageResult:
    """Online DPO: pairs sampled by the policy and ranked by `reward` each step; `prompts` as for ppo."""
    return _run("online_dpo", config, resume, overrides, fields)


def evaluate(config: ConfigInput = None, /, *, overrides: Sequence[str] | None = None, **fields: Any) -> StageResult:
    """Compare `models` (name -> reference) on held-out prompts: perplexity, ROUGE-L, reward, win rate, KL."""
    return run_stage("evaluate", stage_config("evaluate", config, overrides, fields))


def pipeline(
    config: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] | None = None,
    from_stage: str | None = None,
    only: str | None = None,
) -> PipelineResult:
    """Run the stages a pipeline config lists (a YAML file, or the same tree as a mapping), as
    `rlhfkit pipeline` does: complete stages are skipped and an interrupted one resumes."""
    from rlhfkit.files import read_json_or_empty
    from rlhfkit.pipeline_runner import run_pipeline

    library_defaults()
    source: Any = os.fspath(config) if isinstance(config, os.PathLike) else config
    if isinstance(source, Mapping):
        source = {
            name: stage_fields(name, section) if name in registry.STAGES and isinstance(section, Mapping) else section
            for name, section in source.items()
        }
    root, configs = run_pipeline(source, list(overrides or []), from_stage, only, "rlhfkit.pipeline()")
    stages = {}
    for name, stage_config_ in configs.items():  # with rounds, the loop's stages once per round: STAGE@r
        run_dir = registry.stage(stage_of(name)).output_dir(stage_config_)
        stages[name] = StageResult(name, run_dir, read_json_or_empty(run_dir / "metrics.json"), stage_config_)
    return PipelineResult(root, root / "report.html", stages)


# --- models: load, generate, score, merge -----------------------------------------------------


def load(
    model: str | os.PathLike[str] | StageResult, dtype: Dtype = "auto", device: Literal["cpu", "cuda"] = "cpu"
) -> tuple[Any, Any]:
    """A model and its tokenizer as plain `transformers` objects (a LoRA run's adapter merged into
    its base): `generate`, `save_pretrained` and `push_to_hub` work on them as on any model."""
    import torch

    from rlhfkit.config import ModelSettings
    from rlhfkit.models import load_causal_lm, load_tokenizer, pick_dtype, resolve

    if dtype not in get_args(Dtype) or device not in ("cpu", "cuda"):
        raise UserError(
            f"dtype must be auto, float32, bfloat16 or float16 and device cpu or cuda; got {dtype!r}, {device!r}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: no CUDA GPU is visible to torch here")
    library_defaults()
    source = resolve(_model_reference(model))
    target = torch.device(device)
    policy = load_causal_lm(source, ModelSettings(dtype=dtype), pick_dtype(dtype, target)).to(target)
    return policy, load_tokenizer(source)


def generate(
    model: str | os.PathLike[str] | StageResult,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    template: Literal["auto", "plain", "raw"] = "auto",
    engine: Literal["auto", "hf", "float32"] = "auto",
) -> list[str]:
    """Answers to prompts (user messages, or chat turns), formatted with the model's chat template
    (`template="plain"`: rlhfkit's plain one; `"raw"`: each prompt continued as it is). engine:
    what samples — rlhfkit's decode loop over the model's float32 weights (`"float32"`, CPU,
    Llama-layout models), transformers `generate` (`"hf"`), or the loop where it runs (`"auto"`)."""
    from rlhfkit.config import GenerationSettings
    from rlhfkit.config.sections import check_answer_engine
    from rlhfkit.data.formatting import render_prompt
    from rlhfkit.rollout_copy import generate_answers

    if max_new_tokens <= 0 or temperature < 0 or not 0 < top_p <= 1:
        raise UserError("max_new_tokens must be > 0, temperature >= 0 and top_p in (0, 1]")
    if template not in ("auto", "plain", "raw"):
        raise UserError(f"template must be auto, plain or raw, got {template!r}")
    check_answer_engine(engine)
    if isinstance(prompts, str):
        raise UserError("prompts: expected a list of prompts, got one string (wrap it in a list)")
    policy, tokenizer = load(model)
    texts = []
    for prompt in prompts:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(t) for t in prompt]
        if template == "raw":
            texts.append(prompt if isinstance(prompt, str) else "\n".join(t["content"] for t in turns))
        else:
            texts.append(render_prompt(tokenizer, turns, "plain" if template == "plain" else "auto"))
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, engine=engine)
    return generate_answers(policy, tokenizer, texts, settings, seed)


def score(
    reward_model: str | os.PathLike[str] | StageResult,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    max_length: int = 512,
) -> list[float]:
    """One reward per (prompt, response), from a reward run, a reward adapter or a one-output classifier."""
    from rlhfkit.rewards import RewardModelScorer

    if isinstance(prompts, str) or isinstance(responses, str):
        raise UserError("prompts and responses: expected lists, got a string (wrap it in a list)")
    if len(prompts) != len(responses):
        raise UserError(f"give one response per prompt: {len(prompts)} prompts, {len(responses)} responses")
    if max_length < 8:
        raise UserError(f"max_length must be at least 8 tokens, got {max_length}")
    library_defaults()
    reference = _model_reference(reward_model)
    return RewardModelScorer(reference, max_length=max_length).score(list(prompts), list(responses))


def merge(model: str | os.PathLike[str] | StageResult, output_dir: str | os.PathLike[str]) -> Path:
    """A LoRA adapter (or a run's) merged into its base, saved as a standalone model."""
    from rlhfkit.models import merge_to_directory

    target = Path(output_dir)
    if target.exists():
        raise UserError(f"{target} already exists; choose a new output directory")
    return merge_to_directory(_model_reference(model), target)
