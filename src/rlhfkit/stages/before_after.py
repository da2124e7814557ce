"""What a stage measures before and after training, and the answers it shows side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhfkit.data.formatting import render_prompt
from rlhfkit.engine import Engine
from rlhfkit.metrics import describe, write_answers_before_after
from rlhfkit.rewards import RewardModelScorer
from rlhfkit.rollout_copy import generate_answers


def measure(engine: Engine, metrics: dict, when: str, evaluate: Callable[[], dict] | None) -> None:
    """Held-out metrics of the model now, stored as metrics[when] and printed.

    "before" is measured once per run and written at once, so a resumed run keeps it.
    """
    if evaluate is None or (when == "before" and when in metrics):
        return
    with engine.whole_weights():
        metrics[when] = evaluate()
    if when == "before":
        engine.run.update_json("metrics.json", before=metrics["before"])
    print(f"{when}: {describe(metrics[when])}")


def write_samples(engine: Engine, prompt_turns: Sequence, metrics: dict, references: Sequence[str | None]) -> None:
    """samples.md: each held-out prompt with the answers before and after (and the reference), main process only."""
    if engine.is_main:
        write_answers_before_after(engine.run.root, prompt_turns, metrics, references)


class HeldOutAnswers:
    """The policy's answers to held-out questions, before and after an offline alignment stage,
    with their mean reward-model score when `eval.reward_model` is set.

    The questions are the held-out examples' prompts, each once (a question may have several
    pairs or labelled answers), at most generation.num_prompts, then generation.extra_prompts.
    """

    def __init__(self, tokenizer: Any, held_out: Sequence[Any], config: Any) -> None:
        self.tokenizer, self.generation, self.seed = tokenizer, config.generation, config.train.seed
        unique = {tuple((m["role"], m["content"]) for m in example.prompt): example.prompt for example in held_out}
        self.prompt_turns = list(unique.values())[: self.generation.num_prompts]
        self.prompt_turns += [({"role": "user", "content": text},) for text in self.generation.extra_prompts]
        self.prompt_texts = [render_prompt(tokenizer, turns, config.data.template) for turns in self.prompt_turns]
        self.scorer = (
            RewardModelScorer(
                config.eval.reward_model,
                config.data.max_length,
                config.data.template,
                max_length_field="data.max_length",
            )
            if config.eval.reward_model and self.prompt_texts
            else None
        )

    def __call__(self, model: torch.nn.Module) -> dict:
        """{"answers": [...]} and, with a reward model, "reward_model_score": their mean score."""
        answers = generate_answers(model, self.tokenizer, self.prompt_texts, self.generation, self.seed)
        scores: dict = {"answers": answers}
        if self.scorer is not None and answers:
            rewards = self.scorer.score(self.prompt_turns, answers)
            scores["reward_model_score"] = sum(rewards) / len(rewards)
        return scores

    def write(self, engine: Engine, metrics: dict) -> None:
        """samples.md with the answers before and after."""
        if self.prompt_texts:
            write_samples(engine, self.prompt_turns, metrics, [])
