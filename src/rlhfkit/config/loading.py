"""Config loading: YAML files, dotted ``--set`` overrides, and the pipeline that chains stages.

Stage names and their config classes come from the stage registry; nothing here lists them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from rlhfkit import registry
from rlhfkit.config.feedback import label_export_paths
from rlhfkit.config.rounds import round_key, round_output
from rlhfkit.config.sections import Section
from rlhfkit.errors import ConfigError


class PipelineSettings(Section):
    """The `pipeline:` section: which stages run, from which model, into which run directory."""

    output_dir: str = Field("runs/pipeline", description="Run directory: one subdirectory per stage, plus the report.")
    model: str = Field("smollm2-135m-instruct", description="The starting (base) model of the first stage.")
    stages: list[str] = Field(
        default_factory=lambda: list(registry.DEFAULT_PIPELINE), description="Stages to run, in this order."
    )
    rounds: int = Field(
        1,
        ge=1,
        description="Run the loop — the stages from `label` up to the evaluation — this many times, each round "
        "labelling the latest policy's answers and training from it, in OUTPUT_DIR/round-N/.",
    )

    @field_validator("stages")
    @classmethod
    def _order(cls, stages: list[str]) -> list[str]:
        order = registry.names()
        if not stages:
            raise ValueError("name at least one stage")
        unknown = [stage for stage in stages if stage not in order]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))} (the stages are {', '.join(order)})")
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage is listed twice: {stages}")
        expected = [stage for stage in order if stage in stages]
        if stages != expected:
            raise ValueError(f"stages must run in the order {', '.join(order)} (got {', '.join(stages)})")
        return stages

    @model_validator(mode="after")
    def _a_loop_to_repeat(self) -> PipelineSettings:
        if self.rounds > 1 and not self.loop:
            raise ValueError("rounds repeat sample -> label -> train: list a label stage and a stage after it")
        return self

    @property
    def loop(self) -> list[str]:
        """The stages a round repeats: from the first `label` stage up to the evaluation."""
        labels = [index for index, stage in enumerate(self.stages) if registry.stage(stage).kind == "feedback"]
        if not labels:
            return []
        return [s for s in self.stages[labels[0] :] if registry.stage(s).kind != "evaluation"]

    def run_order(self) -> list[tuple[str, str, int]]:
        """(key, stage, round) of every run, in order: the stages before the loop, the loop once
        per round, then the rest (the evaluation)."""
        loop = self.loop
        before = [s for s in self.stages[: self.stages.index(loop[0])]] if loop else list(self.stages)
        after = [s for s in self.stages if s not in before and s not in loop]
        rounds = [(round_key(s, r), s, r) for r in range(1, self.rounds + 1) for s in loop]
        return [(s, s, 1) for s in before] + rounds + [(s, s, 1) for s in after]


def _set_default(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree[a][b] = value unless the user's config already sets it."""
    *sections, key = dotted.split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            return  # the user's value is not a section: validation will name it
    node.setdefault(key, value)


def chain_stage_tree(
    stage: str, tree: dict[str, Any], pipeline: PipelineSettings, sections: dict[str, Any], round_number: int = 1
) -> dict[str, Any]:
    """A stage's config tree with what the pipeline implies filled in where the user left it unset.

    Each stage writes to OUTPUT_DIR/STAGE; the first policy stage (pretrain) starts from
    pipeline.model and every later stage from the last policy stage before it; the label stage
    labels that model's answers, and the reward and offline stages after it train on its export
    (👍/👎 rows where they take them, else preference pairs); online RL stages are rewarded by the
    reward stage's model, offline alignment's answers are scored by it, and the evaluation
    compares the base model, the last policy stage and every aligned model, on the held-out data
    of the stage that supplies it (SFT).

    With `pipeline.rounds` > 1 the loop's stages (from `label` on) run again in OUTPUT_DIR/round-r:
    round r labels the answers of round r − 1's last aligned policy, its reward model trains on
    round r's labels (from the same start as round 1's), each aligned stage starts from its own
    round r − 1 output, and the evaluation compares every round's aligned models.
    """
    tree = copy.deepcopy(tree)
    root, loop, last_round = Path(pipeline.output_dir), pipeline.loop, pipeline.rounds
    earlier = pipeline.stages[: pipeline.stages.index(stage)] if stage in pipeline.stages else list(pipeline.stages)

    def output(name: str, number: int | None = None) -> str:
        """Where `name` writes in round `number` (default: this stage's round; outside the loop, round 1)."""
        return str(round_output(root, name, (number or round_number) if name in loop else 1))

    policies = [name for name in earlier if registry.stage(name).kind == "policy"]
    reward_models = [name for name in earlier if registry.stage(name).kind == "reward"]
    aligned = [name for name in loop if registry.stage(name).kind in registry.ALIGNMENT_KINDS]
    kind = registry.stage(stage).kind
    if kind == "evaluation":
        _set_default(tree, "output_dir", output(stage))
        compared = policies[-1:] + [name for name in earlier if registry.stage(name).kind in registry.ALIGNMENT_KINDS]
        models = {"base": pipeline.model, **{name: output(name) for name in compared}}
        for number in range(2, last_round + 1):
            models.update({round_key(name, number): output(name, number) for name in compared if name in aligned})
        tree.setdefault("models", models)
        if reward_models:
            tree.setdefault("reward_model", output(reward_models[-1], last_round))
        for source in registry.names():
            source_tree = sections.get(source) if registry.stage(source).supplies_evaluation_data else None
            if isinstance(source_tree, dict):
                if "data" in source_tree:
                    tree.setdefault("data", source_tree["data"])
                if isinstance(source_tree.get("train"), dict) and "seed" in source_tree["train"]:
                    tree.setdefault("seed", source_tree["train"]["seed"])
        return tree
    starting_model = output(policies[-1]) if policies else pipeline.model
    if round_number > 1 and kind == "feedback" and aligned:  # the latest policy answers
        starting_model = output(aligned[-1], round_number - 1)
    elif round_number > 1 and stage in aligned:  # each aligned stage goes on from where it got to
        starting_model = output(stage, round_number - 1)
    if kind == "feedback":
        _set_default(tree, "output_dir", output(stage))
        _set_default(tree, "model", starting_model)
        return tree
    _set_default(tree, "train.output_dir", output(stage))
    _set_default(tree, "model.name_or_path", starting_model)
    labels = [name for name in earlier if registry.stage(name).kind == "feedback"]
    if labels and kind in ("reward", "offline"):
        _set_default(tree, "data.path", str(_label_export(labels[-1], stage, sections, output)))
    if reward_models:
        if kind == "online":
            reward = tree.setdefault("reward", {})
            if isinstance(reward, dict) and "function" not in reward and "model" not in reward:
                reward["model"] = output(reward_models[-1])
        elif kind == "offline":
            _set_default(tree, "eval.reward_model", output(reward_models[-1]))
    return tree


def _label_export(label_stage: str, stage: str, sections: dict[str, Any], output) -> Path:
    """The label stage's export a later stage trains on: 👍/👎 rows for the reward model and KTO
    when people labelled single answers, else the preference pairs (for single answers, each
    prompt's liked × disliked pairs)."""
    section = sections.get(label_stage)
    kind = section.get("kind", "pairwise") if isinstance(section, dict) else "pairwise"
    paths = label_export_paths(output(label_stage), kind)
    return paths["feedback"] if "feedback" in paths and stage in ("reward", "kto") else paths["preferences"]


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
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; `rlhfkit STAGE --help` lists the sections)"
        elif "input" in item and not isinstance(item["input"], dict) and str(item["input"]) not in message:
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


def _validate(
    config_class: type[Section],
    tree: dict[str, Any],
    source: str,
    pipeline: PipelineSettings | None = None,
    config_file: str | Path | None = None,
    whole_pipeline: bool = False,
) -> Any:
    """A validated config. With a pipeline, its stages' outputs are known by the stage that writes
    them: pending when the whole pipeline runs, named when a single stage needs one not yet written."""
    written_by = (
        {str(round_output(pipeline.output_dir, stage, number)): key for key, stage, number in pipeline.run_order()}
        if pipeline
        else {}
    )
    context = {
        "pipeline_outputs": set(written_by) if whole_pipeline else set(),
        "written_by": written_by,
        "config_file": str(config_file) if config_file else "CONFIG",
    }
    try:
        return config_class.model_validate(tree, context=context)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def _check_top_level(loaded: dict[str, Any], path: str | Path) -> None:
    """A multi-stage file holds only the pipeline section and stage sections (a misspelt stage
    name would otherwise be ignored and that stage run on defaults)."""
    unknown = sorted(set(loaded) - set(registry.names()) - {"pipeline"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level section(s) {', '.join(unknown)} (expected pipeline, {', '.join(registry.names())})"
        )


def _pipeline_settings(loaded: dict[str, Any], source: str) -> PipelineSettings:
    section = loaded.get("pipeline")
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: pipeline: expected a section (output_dir, model, stages)")
    return _validate(PipelineSettings, section, f"{source} [pipeline]")


ConfigSource = str | Path | Mapping[str, Any] | None


def deep_merge(tree: dict[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` with `fields` laid over it: sections merge key by key, values replace."""
    merged = copy.deepcopy(tree)
    for key, value in fields.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(dict(value)) if isinstance(value, Mapping) else value
    return merged


def _read_source(source: ConfigSource, label: str) -> tuple[dict[str, Any], str]:
    """The top-level tree of a YAML file, or of a mapping given in Python, and how errors name it."""
    if source is None:
        return {}, "(defaults)"
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), label
    return _read_yaml(source), str(source)


def load_config(
    stage: str,
    path: ConfigSource,
    overrides: list[str] | None = None,
    fields: Mapping[str, Any] | None = None,
    label: str = "(python)",
) -> Any:
    """Read a stage config from YAML or a mapping (defaults when None), lay `fields` over it, apply
    overrides, validate it.

    In a multi-stage file each stage reads its own top-level section; when the file also has a
    `pipeline:` section, the stage's model and output paths follow the pipeline (chain_stage_tree).
    """
    config_class = registry.stage(stage).config_class
    loaded, source = _read_source(path, label)
    tree = loaded
    # A multi-stage file (configs/quickstart.yaml) keeps each stage under its own key.
    if isinstance(loaded.get(stage), dict) or "pipeline" in loaded:
        _check_top_level(loaded, source)
        tree = copy.deepcopy(loaded.get(stage) or {})
        source = f"{source} [{stage}]"
    tree = deep_merge(tree, fields or {})
    for assignment in overrides or []:
        apply_override(tree, assignment)
    config_file = path if isinstance(path, (str, Path)) else None
    pipeline = _pipeline_settings(loaded, str(config_file or label)) if "pipeline" in loaded else None
    if pipeline is not None:
        tree = chain_stage_tree(stage, tree, pipeline, loaded)
    return _validate(config_class, tree, source, pipeline, config_file)


def load_pipeline(
    path: str | Path | Mapping[str, Any], overrides: list[str] | None = None, label: str = "(python)"
) -> tuple[PipelineSettings, dict[str, Any]]:
    """The pipeline settings and every listed stage's validated config, before anything runs.

    `path` is a YAML file or the same tree as a mapping. Overrides name the stage first:
    `--set sft.train.lr=1e-4`, `--set pipeline.output_dir=runs/x`.
    """
    config_file = path if isinstance(path, (str, Path)) else None
    loaded, source = _read_source(path, label)
    for assignment in overrides or []:
        apply_override(loaded, assignment)
    loaded.setdefault("pipeline", {})
    pipeline = _pipeline_settings(loaded, source)
    _check_top_level(loaded, source)
    configs = {}
    for key, stage, round_number in pipeline.run_order():  # with rounds, the loop's stages once per round (STAGE@r)
        section = loaded.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source} [{stage}]: expected a section, got {type(section).__name__}")
        tree = chain_stage_tree(stage, section, pipeline, loaded, round_number)
        configs[key] = _validate(
            registry.stage(stage).config_class, tree, f"{source} [{key}]", pipeline, config_file, whole_pipeline=True
        )
    return pipeline, configs
