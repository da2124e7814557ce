"""The one list of stages: name → config class, recipe module, kind and summary.

The command line, the pipeline, config loading and `--help` all read it, so adding a stage is
one module in `stages/` (with a `run(config, resume=False)` function) and one entry here. The
list is in pipeline order: a pipeline runs the stages it names in this order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import (
    DPOConfig,
    EvaluateConfig,
    GRPOConfig,
    KTOConfig,
    LabelConfig,
    OnlineDPOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    Section,
    SFTConfig,
    TRPOConfig,
)

# policy: trains the policy the later stages start from; feedback: collects labels of the policy's
# answers (people or a judge) that the later stages train on; reward: trains the reward model the
# later stages score with; offline / online: align the policy on fixed preference pairs / on its
# own rewarded samples; evaluation: compares models and trains nothing.
StageKind = Literal["policy", "feedback", "reward", "offline", "online", "evaluation"]
ALIGNMENT_KINDS: tuple[StageKind, ...] = ("offline", "online")


@dataclass(frozen=True)
class Stage:
    name: str
    config_class: type[Section]
    module: str  # the recipe, imported when the stage runs (it pulls in torch and transformers)
    kind: StageKind
    summary: str  # one line, for `rlhfkit --help`
    example_override: str = "train.lr=1e-4"  # shown in the stage's --help
    example_config: str = "configs/quickstart.yaml"  # likewise
    supplies_evaluation_data: bool = (
        False  # a pipeline's evaluation uses this stage's data (and seed) for its held-out set
    )
    command: str = ""  # the command line's words for it (default: the name)

    @property
    def command_line(self) -> str:
        return self.command or self.name

    @property
    def trains(self) -> bool:
        """Whether the stage trains through the engine (and so runs under `accelerate launch`)."""
        return self.kind not in ("feedback", "evaluation")

    @property
    def runner(self) -> Callable[..., Any]:
        """The recipe's run(config, resume=False)."""
        return importlib.import_module(self.module).run

    def output_dir(self, config: Any) -> Path:
        """Where a run of this stage writes."""
        return Path(config.train.output_dir if self.trains else config.output_dir).expanduser()


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "pretrain",
            PretrainConfig,
            "rlhfkit.stages.pretrain",
            "policy",
            "Continue causal-LM training on raw domain text; reports held-out perplexity before and after.",
        ),
        Stage(
            "sft",
            SFTConfig,
            "rlhfkit.stages.sft",
            "policy",
            "Supervised fine-tuning on prompt->response pairs (loss on responses only, LoRA by default).",
            supplies_evaluation_data=True,
        ),
        Stage(
            "label",
            LabelConfig,
            "rlhfkit.stages.label",
            "feedback",
            "Sample answers from the model so far and have them labelled (people on the page, or a judge); export.",
            example_override="people.port=8080",
            example_config="configs/examples/loop_tutor_people.yaml",
            command="label run",  # `rlhfkit label` also holds the labeling tools (generate, serve, ...)
        ),
        Stage(
            "reward",
            RewardConfig,
            "rlhfkit.stages.reward",
            "reward",
            "Train a reward model on preference pairs (Bradley-Terry loss); reports held-out pair accuracy.",
        ),
        Stage(
            "dpo",
            DPOConfig,
            "rlhfkit.stages.dpo",
            "offline",
            "Direct preference optimisation (DPO / cDPO / IPO / SimPO / ORPO) of a policy on preference pairs.",
        ),
        Stage(
            "kto",
            KTOConfig,
            "rlhfkit.stages.kto",
            "offline",
            "Kahneman-Tversky optimisation (KTO) of a policy on answers labelled thumbs up or down.",
        ),
        Stage(
            "ppo",
            PPOConfig,
            "rlhfkit.stages.ppo",
            "online",
            "Online RL with PPO: critic, GAE, clipped updates and a KL penalty to the reference policy.",
        ),
        Stage(
            "grpo",
            GRPOConfig,
            "rlhfkit.stages.grpo",
            "online",
            "Online RL with GRPO: group-relative advantages, no critic, k3 KL to the reference.",
        ),
        Stage(
            "trpo",
            TRPOConfig,
            "rlhfkit.stages.trpo",
            "online",
            "Online RL with TRPO: natural-gradient steps inside a KL trust region.",
        ),
        Stage(
            "online_dpo",
            OnlineDPOConfig,
            "rlhfkit.stages.online_dpo",
            "online",
            "Online DPO: each step the policy answers twice (or more), the reward picks the best and worst, a DPO step.",
        ),
        Stage(
            "evaluate",
            EvaluateConfig,
            "rlhfkit.stages.evaluate",
            "evaluation",
            "Compare models on the same held-out prompts: perplexity, ROUGE-L, reward, win rate, KL, length, distinct-n.",
            example_override="num_prompts=8",
        ),
    )
}


DEFAULT_PIPELINE = ("pretrain", "sft", "reward", "ppo", "evaluate")  # classic RLHF


def stage(name: str) -> Stage:
    return STAGES[name]


def names(*kinds: StageKind) -> tuple[str, ...]:
    """Stage names in pipeline order, of the given kinds (all when none is given)."""
    return tuple(name for name, entry in STAGES.items() if not kinds or entry.kind in kinds)


def training_stages() -> tuple[str, ...]:
    return tuple(name for name, entry in STAGES.items() if entry.trains)
