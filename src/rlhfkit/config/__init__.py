"""Validated config models: the shared sections and one config class per stage.

Loading from YAML, `--set` overrides and pipeline chaining live in `rlhfkit.config.loading`.
"""

from rlhfkit.config.evaluate import EvalSamplingSettings, EvaluateConfig, RewardHackingThresholds
from rlhfkit.config.offline import (
    DPOConfig,
    DPOSettings,
    PreferenceDataSettings,
    PreferenceEvalSettings,
    PretrainConfig,
    RewardConfig,
    RewardLossSettings,
    SFTConfig,
)
from rlhfkit.config.online import (
    GRPOConfig,
    GRPOSettings,
    PPOConfig,
    PPOSettings,
    PromptDataSettings,
    RewardSourceSettings,
    RLConfig,
    RLEvalSettings,
    RolloutSettings,
    TRPOConfig,
    TRPOSettings,
)
from rlhfkit.config.sections import (
    BUILTIN_PREFIX,
    DATA_FILE_SUFFIXES,
    ChatDataSettings,
    DataSettings,
    EvalSettings,
    GenerationSettings,
    LoraSettings,
    ModelSettings,
    SamplingSettings,
    Section,
    StageConfig,
    TextDataSettings,
    TrainSettings,
    dump_config,
)

__all__ = [
    "BUILTIN_PREFIX", "DATA_FILE_SUFFIXES", "ChatDataSettings", "DPOConfig", "DPOSettings", "DataSettings", "EvalSamplingSettings",
    "EvalSettings", "EvaluateConfig", "GRPOConfig", "GRPOSettings", "GenerationSettings", "LoraSettings", "ModelSettings",
    "PPOConfig", "PPOSettings", "PreferenceDataSettings", "PreferenceEvalSettings", "PretrainConfig", "PromptDataSettings",
    "RLConfig", "RLEvalSettings", "RewardConfig", "RewardHackingThresholds", "RewardLossSettings", "RewardSourceSettings",
    "RolloutSettings", "SFTConfig", "SamplingSettings", "Section", "StageConfig", "TRPOConfig", "TRPOSettings",
    "TextDataSettings", "TrainSettings", "dump_config",
]
