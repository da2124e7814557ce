"""rlhfkit: align causal language models with human feedback.

The Python API (`rlhfkit.sft(...)`, `rlhfkit.pipeline(...)`, `rlhfkit.load(...)`) lives in
`rlhfkit.api`; see its docstring. Importing rlhfkit loads neither torch nor transformers.
"""

__version__ = "0.1.0"

from rlhfkit.api import (  # noqa: E402
    PipelineResult,
    StageResult,
    dpo,
    evaluate,
    generate,
    grpo,
    kto,
    label,
    load,
    merge,
    online_dpo,
    pipeline,
    ppo,
    pretrain,
    reward,
    score,
    sft,
    trpo,
)
from rlhfkit.errors import ConfigError, DataError, TrainingError, UserError  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "PipelineResult",
    "StageResult",
    "TrainingError",
    "UserError",
    "__version__",
    "dpo",
    "evaluate",
    "generate",
    "grpo",
    "kto",
    "label",
    "load",
    "merge",
    "online_dpo",
    "pipeline",
    "ppo",
    "pretrain",
    "reward",
    "score",
    "sft",
    "trpo",
]
