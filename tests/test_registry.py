"""The stage registry is the one list of stages: a stage added to it is a command, a pipeline stage and a config section."""

import sys
import types

from rlhfkit import registry
from rlhfkit.cli import build_parser, main
from rlhfkit.config import StageConfig
from rlhfkit.config.loading import load_pipeline


class ToyConfig(StageConfig):
    """A stage config with the shared sections only."""


def test_a_stage_added_to_the_registry_is_a_command_a_pipeline_stage_and_a_config_section(
    monkeypatch, tmp_path, tiny_model
):
    runs = []
    module = types.ModuleType("toy_stage")
    module.run = lambda config, resume=False: runs.append((config.train.output_dir, config.model.name_or_path, resume))
    monkeypatch.setitem(sys.modules, "toy_stage", module)
    monkeypatch.setitem(registry.STAGES, "toy", registry.Stage("toy", ToyConfig, "toy_stage", "online", "A toy stage."))

    assert "toy" in build_parser()._subparsers._group_actions[0].choices
    assert (
        main(["toy", "--set", f"model.name_or_path={tiny_model}", "--set", f"train.output_dir={tmp_path / 'alone'}"])
        == 0
    )
    assert runs == [(str(tmp_path / "alone"), str(tiny_model), False)]

    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(
        f"pipeline:\n  output_dir: {tmp_path / 'run'}\n  model: {tiny_model}\n  stages: [sft, toy]\n"
        "toy:\n  train:\n    lr: 0.5\n"
    )
    pipeline, configs = load_pipeline(config_file)
    assert configs["toy"].train.lr == 0.5
    assert configs["toy"].model.name_or_path == str(tmp_path / "run" / "sft")  # chained from the policy stage before it
    assert registry.stage("toy").output_dir(configs["toy"]) == tmp_path / "run" / "toy"


def test_the_registry_lists_the_stages_in_pipeline_order_with_their_kinds():
    assert registry.names() == (
        "pretrain",
        "sft",
        "label",
        "reward",
        "dpo",
        "kto",
        "ppo",
        "grpo",
        "trpo",
        "online_dpo",
        "evaluate",
    )
    assert registry.names("policy") == ("pretrain", "sft")
    assert registry.names(*registry.ALIGNMENT_KINDS) == ("dpo", "kto", "ppo", "grpo", "trpo", "online_dpo")
    assert registry.names("feedback") == ("label",) and registry.stage("label").command_line == "label run"
    assert registry.training_stages() == tuple(name for name in registry.names() if name not in ("label", "evaluate"))
    assert all(callable(stage.runner) for stage in registry.STAGES.values())
