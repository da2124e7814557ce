"""What the online RL stages measure: a scored rollout's summary (reward, KL to the reference,
entropy, length), and the held-out evaluation before, during and after training — the training
reward and each held-out judge on the same sampled answers, per value of a prompt column
(`eval.group_by`, e.g. accuracy per operation), and optionally the greedy answers' reward
(`eval.greedy`: what a user sees with deterministic decoding)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from rlhfkit.config import RLConfig
from rlhfkit.data.examples import PromptExample
from rlhfkit.engine import Engine
from rlhfkit.errors import DataError
from rlhfkit.metrics import by_group, describe, mean_and_stderr, paired_difference
from rlhfkit.rewards import RewardSource, ScoredBatch, score_completions
from rlhfkit.sampling import Rollout, row_seed

if TYPE_CHECKING:
    from rlhfkit.stages.online import RLSetup, Rollouts


def training_mask(rollout: Rollout, scored: ScoredBatch) -> torch.Tensor:
    """(N, R) the response tokens that train: samples whose reward was left out (invalid) are zeroed."""
    return rollout.response_mask * scored.valid[:, None].to(rollout.response_mask.device)


def rollout_summary(
    rollout: Rollout,
    scored: ScoredBatch,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Reward, KL to the reference, entropy and length statistics of a scored rollout, and when
    another engine sampled it, `sampler_kl`: the k1 estimate of KL(π_sampler ‖ π_train) per token
    (a token the sampler gave no log-prob for counts as agreeing).

    gather: concatenates per-completion rows over processes, when each holds a share of the rollout.
    """
    mask = training_mask(rollout, scored)
    sampler_gap = torch.zeros(rollout.size)
    if rollout.sampler_logprobs is not None:
        sampler = rollout.sampler_logprobs.to(logprobs.device)
        sampler_gap = ((torch.nan_to_num(sampler - logprobs, nan=0.0)) * mask).sum(dim=1).float().cpu()
    per_completion = torch.stack(
        [
            scored.scores.float(),  # 0 where invalid
            scored.valid.float(),
            ((logprobs - ref_logprobs) * mask).sum(dim=1).float().cpu(),  # Σ_t log π/π_ref: unbiased KL(π‖π_ref)
            rollout.lengths.float().cpu(),
            rollout.ended.float().cpu(),
            (entropy * mask).sum(dim=1).float().cpu() if entropy is not None else torch.zeros(rollout.size),
            mask.sum(dim=1).float().cpu(),
            sampler_gap,
            scored.disagreement if scored.disagreement is not None else torch.zeros(rollout.size),
        ],
        dim=1,
    )
    if gather is not None:
        per_completion = gather(per_completion)
    columns = per_completion.unbind(dim=1)
    scores, valid, sequence_kl, lengths, ended, entropy_sums, tokens, sampler_gap, disagreement = columns
    valid = valid.bool()
    # float64: the mean and spread of rewards near float32's limit still exist
    scores, sequence_kl = scores[valid].double(), sequence_kl[valid]
    summary = {
        "reward_mean": float(scores.mean()) if len(scores) else math.nan,
        "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl": float(sequence_kl.mean()) if len(sequence_kl) else math.nan,
        "length": float(lengths.mean()),
        "eos_fraction": float(ended.mean()),
    }
    if entropy is not None:
        summary["entropy"] = float(entropy_sums.sum() / tokens.sum().clamp(min=1))
    if rollout.sampler_logprobs is not None:
        summary["sampler_kl"] = float(sampler_gap.sum() / tokens.sum().clamp(min=1))
    if scored.disagreement is not None:
        summary["reward_disagreement"] = float(disagreement[valid].mean()) if valid.any() else math.nan
    skipped = int((~valid).sum())  # scored.skipped, over every process's completions
    if skipped:
        summary["skipped_samples"] = float(skipped)
    return summary


def check_group_column(examples: list[PromptExample], column: str | None) -> None:
    """eval.group_by names a column every held-out prompt row has (the first row without it is named)."""
    if column is None:
        return
    for example in examples:
        if example.columns.get(column) is None:
            found = ", ".join(sorted(example.columns)) or "none"
            raise DataError(
                f"{example.where}: eval.group_by is {column!r}, but this held-out row has no such column "
                f"(its other columns: {found})"
            )


def scores_summary(values: list[float | None], groups: list[str] | None) -> dict:
    """Mean and standard error of per-answer scores (None: left out), and per group when labelled."""
    mean, stderr = mean_and_stderr([value for value in values if value is not None])
    summary: dict = {"reward_mean": mean, "reward_stderr": stderr, "sample_rewards": values}
    if groups is not None:
        summary.update(groups=by_group(values, groups), sample_groups=groups)
    return summary


def add_paired_gains(before: dict, after: dict) -> None:
    """The after-evaluation's paired gains over the before one (same prompts and sample slots): of the
    training reward, and of the greedy answers' (eval.greedy), overall and per group (eval.group_by)."""
    for later, earlier in ((after, before), (after.get("greedy"), before.get("greedy"))):
        if not later or not earlier:
            continue
        gain = paired_difference(later.get("sample_rewards", []), earlier.get("sample_rewards", []))
        if gain is None:
            continue
        later.update(reward_gain=gain[0], reward_gain_stderr=gain[1])
        if "sample_groups" in later:
            later["groups"] = by_group(later["sample_rewards"], later["sample_groups"], earlier["sample_rewards"])


def held_out_evaluation(
    config: RLConfig,
    setup: RLSetup,
    rollouts: Rollouts,
    eval_examples: list[PromptExample],
    judges: dict[str, RewardSource],
) -> Callable[[], dict]:
    """Mean reward, KL, entropy and length on held-out prompts, each held-out judge's scores of the
    same answers, per group of eval.group_by, and with eval.greedy the reward of one greedy answer per
    prompt; the RNG of training is left untouched."""
    column = config.eval.group_by
    prompt_groups = [str(example.columns[column]) for example in eval_examples] if column else None

    @torch.no_grad()
    def evaluate() -> dict:
        samples = config.eval.samples_per_prompt
        with torch.random.fork_rng():  # a reward function's own randomness leaves training's alone
            torch.manual_seed(config.eval.seed)
            seeds = [row_seed(config.eval.seed, index) for index in range(len(eval_examples) * samples)]
            rollout, scored = rollouts.sample_and_score(eval_examples, samples, seeds, held_out=True)
            answered = [eval_examples[i] for i in rollout.prompt_index.tolist()]
            judged = {
                name: score_completions(
                    judge,
                    [e.prompt for e in answered],
                    rollout.completions,
                    [e.columns for e in answered],
                    rollout.ended,
                )
                for name, judge in judges.items()
            }
            greedy = None
            if config.eval.greedy:
                greedy = rollouts.sample_and_score(eval_examples, 1, seeds[::samples], greedy=True, held_out=True)
        logprobs, entropy = setup.logprobs(setup.policy, rollout, with_entropy=True)
        summary = rollout_summary(rollout, scored, logprobs, setup.reference_logprobs(rollout), entropy)
        sample_groups = None if prompt_groups is None else [prompt_groups[i] for i in rollout.prompt_index.tolist()]
        sampled = scores_summary(scored.per_answer(), sample_groups)
        summary.update({key: value for key, value in sampled.items() if key != "reward_mean"})
        summary["answers"] = rollout.completions[::samples]
        if greedy is not None:
            summary["greedy"] = scores_summary(greedy[1].per_answer(), prompt_groups)
            summary["greedy"]["answers"] = greedy[0].completions
        if judged:
            summary["judges"] = {}
        for name, judge_scores in judged.items():
            values = judge_scores.per_answer()
            mean, stderr = mean_and_stderr([value for value in values if value is not None])
            summary["judges"][name] = {"mean": mean, "stderr": stderr, "samples": values}
        return summary

    return evaluate


def evaluate_during_training(engine: Engine, metrics: dict, evaluate: Callable[[], dict]) -> None:
    """A held-out evaluation at this step (eval.every): kept in metrics.json's "during" (so a resumed
    run keeps it) and logged as eval/reward_mean, eval/kl, eval/greedy_reward_mean and eval/judge/NAME."""
    with engine.whole_weights():
        point = {"step": engine.progress.step, **evaluate()}
    metrics["during"] = [*metrics.get("during", []), point]
    engine.run.update_json("metrics.json", during=metrics["during"])
    logged = {f"eval/{key}": point[key] for key in ("reward_mean", "kl", "length") if key in point}
    if "greedy" in point:
        logged["eval/greedy_reward_mean"] = point["greedy"]["reward_mean"]
    logged.update({f"eval/judge/{name}": judge["mean"] for name, judge in point.get("judges", {}).items()})
    engine.log(logged, engine.progress.step)
    tqdm.write(f"step {engine.progress.step} held-out: {describe(point)}")
