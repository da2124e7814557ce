"""DAPO's dynamic sampling, re-sampling part (Yu et al. 2025, §3.2): groups whose completions all
got one reward teach nothing, so fresh prompts are sampled to take their place, for up to
`rounds` extra rounds, until every group of the batch has a spread of rewards.

Each process refills its own share from its own extra prompts (drawn with the run seed, the step,
the round and the process), so the batch keeps its size on every process; a run on another
number of processes draws other replacements. Groups still flat after the last round stay (the
grpo stage then leaves them out of the update).
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import torch

from rlhfkit.config import RLConfig
from rlhfkit.data.examples import PromptExample
from rlhfkit.losses.advantages import spread_groups
from rlhfkit.rewards import ScoredBatch, concat_scored, group_scores
from rlhfkit.sampling import Rollout, concat_rollouts, row_seed


class Sampler(Protocol):
    """What refilling needs of the online stage's Rollouts."""

    train_examples: list[PromptExample]
    config: RLConfig
    tokenizer: Any

    def sample_and_score(
        self, examples: list[PromptExample], samples: int, seeds: list[int]
    ) -> tuple[Rollout, ScoredBatch]: ...


def refill_flat_groups(
    sampler: Sampler, rollout: Rollout, scored: ScoredBatch, rounds: int, step: int, process: int
) -> tuple[Rollout, ScoredBatch, int]:
    """(rollout, scores, groups replaced): flat groups replaced, in order, by groups with a spread
    of rewards sampled from fresh prompts, one round of as many prompts as the share at a time."""
    group_size, seed = sampler.config.rollout.samples_per_prompt, sampler.config.train.seed
    groups = rollout.size // group_size
    chosen = [(rollout, scored, group) for group in range(groups)]  # (source, its scores, its group)
    flat = [
        index for index, spread in enumerate(spread_groups(group_scores(scored, group_size), group_size)) if not spread
    ]
    replaced = 0
    for round_index in range(1, rounds + 1):
        if not flat:
            break
        chance = random.Random(row_seed(seed, step, round_index, process))
        examples = [sampler.train_examples[i] for i in chance.sample(range(len(sampler.train_examples)), groups)]
        seeds = [row_seed(seed, step, round_index, process, index) for index in range(groups * group_size)]
        extra, extra_scored = sampler.sample_and_score(examples, group_size, seeds)
        extra = extra.to(rollout.response_ids.device)
        spread = spread_groups(group_scores(extra_scored, group_size), group_size).tolist()
        for group in [g for g, has_spread in enumerate(spread) if has_spread]:
            if not flat:
                break
            chosen[flat.pop(0)] = (extra, extra_scored, group)
            replaced += 1
    if not replaced:
        return rollout, scored, 0
    rows = lambda group: torch.arange(group * group_size, (group + 1) * group_size)  # noqa: E731
    parts = [(source.select(rows(group)), _select(scores, rows(group))) for source, scores, group in chosen]
    merged = concat_rollouts([part for part, _ in parts], sampler.tokenizer.pad_token_id, group_size)
    return merged, concat_scored([scores for _, scores in parts]), replaced


def _select(scored: ScoredBatch, rows: torch.Tensor) -> ScoredBatch:
    valid = scored.valid[rows]
    kept = scored.scores[rows][valid]
    raw_mean = float(kept.double().mean()) if len(kept) else float("nan")
    disagreement = None if scored.disagreement is None else scored.disagreement[rows]
    return ScoredBatch(scored.scores[rows], valid, raw_mean, int((~valid).sum()), disagreement)
