"""`rlhfkit grpo`: the critic-free RL family (Shao et al. 2024 and its successors).

Per RL step: G completions for each prompt, scored; an advantage per completion (or per token)
without a critic; a clipped (or CISPO) policy objective plus an optional KL term, averaged per
token, per sequence or over a constant. The grpo section's options select the family member
(docs: RL algorithms): RLOO, REINFORCE++ (and its group baseline), GSPO (sequence-level
ratios), DAPO (clip-higher, dynamic sampling, token-level loss, overlong shaping) and CISPO.
Groups whose rewards are all equal carry no gradient; their fraction is logged every step and a
warning says when most of a batch has nothing to learn from.
"""

from __future__ import annotations

import torch

from rlhfkit.config import GRPOConfig
from rlhfkit.engine import LossOutput
from rlhfkit.losses.advantages import (
    group_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    spread_groups,
    zero_variance_fraction,
)
from rlhfkit.losses.grpo import grpo_per_token_loss, rollout_correction
from rlhfkit.losses.masked import masked_mean
from rlhfkit.losses.ppo import aggregate_loss, kl_estimate
from rlhfkit.rewards import ScoredBatch, group_scores
from rlhfkit.sampling import Rollout
from rlhfkit.stages.online import (
    RLSetup,
    RolloutBatch,
    optimizer_steps_per_step,
    run_online,
    run_updates,
    warn,
)
from rlhfkit.stages.rl_measure import rollout_summary, training_mask

STAGE = "grpo"


def describe_flat_groups(fraction: float, rewards: torch.Tensor, group_size: int, max_new_tokens: int) -> str | None:
    """A warning when most groups have one reward for every completion (no learning signal), with
    advice for why: completions that never earn a reward, or prompts every sample already solves."""
    if fraction < 0.5:
        return None
    if fraction == 1.0 and bool((rewards == rewards[0]).all()):
        what = f"every completion got the same reward ({float(rewards[0]):g})"
    else:
        what = f"{fraction:.0%} of groups have zero reward variance"
        flat, top = ~spread_groups(rewards, group_size), rewards.max()
        solved = flat & (rewards.view(-1, group_size)[:, 0] == top)
        if 2 * int(solved.sum()) > int(flat.sum()):
            return (
                f"{what}, most with every completion at the batch's top reward ({float(top):g}): those "
                "groups give no policy gradient. The prompts are mostly solved: raise rollout.samples_per_prompt, "
                "set grpo.dynamic_sampling to replace such groups, or train on harder prompts."
            )
    return (
        f"{what}: those groups give no policy gradient. Check that completions can reach an answer "
        f"(rollout.max_new_tokens={max_new_tokens}), that the reward parses them, or warm the policy up with SFT first."
    )


class GRPO:
    def __init__(self, context: RLSetup) -> None:
        self.context, self.settings = context, context.config.grpo
        self.optimizer_steps_per_step = optimizer_steps_per_step(
            context.config, self.settings.epochs, self.settings.minibatch_size
        )
        # Updating after every minibatch makes later minibatches off-policy; only one pass over
        # the whole batch in one step is truly on-policy. A KL penalty in the reward needs the
        # policy's log-probs before the update.
        self.on_policy = (
            self.settings.epochs == 1
            and self.settings.minibatch_size in (None, self.batch_size)
            and not self.kl_in_reward
            and context.config.rollout.correction == "none"
        )

    @property
    def resample_rounds(self) -> int:
        """Extra sampling rounds that replace flat groups before the update (read by the RL loop)."""
        return self.settings.dynamic_sampling_rounds if self.settings.dynamic_sampling else 0

    @property
    def kl_in_reward(self) -> bool:
        return self.settings.kl_penalty == "reward" and self.settings.beta > 0

    @property
    def batch_size(self) -> int:
        return self.context.config.rollout.prompts_per_step * self.context.config.rollout.samples_per_prompt

    def loss(self, module: torch.nn.Module, batch: RolloutBatch) -> LossOutput:
        settings, targets = self.settings, batch.tensors
        logprobs, entropy = self.context.logprobs(module.policy, batch.rollout, with_entropy=self.on_policy)
        if self.on_policy:  # one pass over fresh samples: the behaviour log-probs are these, detached
            old_logprobs = logprobs.detach()
            self.seen_logprobs[batch.rows, : batch.width] = old_logprobs
            self.seen_entropy[batch.rows, : batch.width] = entropy
        else:
            old_logprobs = targets["old_logprobs"]
        mask = targets["mask"]
        per_token, clipped, kl = grpo_per_token_loss(
            logprobs,
            old_logprobs,
            targets.get("ref_logprobs"),
            targets["advantages"],
            settings.clip,
            0.0 if self.kl_in_reward else settings.beta,
            clip_high=settings.clip_high,
            mask=mask,
            level=settings.importance_level,
            objective=settings.objective,
            max_weight=settings.cispo_max_weight,
            weights=targets.get("correction"),
        )
        aggregate = lambda values: aggregate_loss(  # noqa: E731
            values, mask, settings.loss_aggregation, self.context.config.rollout.max_new_tokens
        )[0]
        return LossOutput(
            aggregate(per_token),
            {"clip_fraction": float(aggregate(clipped)), "kl_term": float(aggregate(kl.detach()))},
        )

    def advantages(
        self,
        rollout: Rollout,
        scored: ScoredBatch,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards after shaping (N,), advantages (N,) or (N, T)) as grpo.advantage says."""
        settings, rollout_settings = self.settings, self.context.config.rollout
        group_size = rollout_settings.samples_per_prompt
        rewards = group_scores(scored, group_size)
        if settings.overlong_buffer is not None:
            lengths = rollout.lengths.float().cpu()
            rewards = rewards + overlong_penalty(
                lengths, rollout_settings.max_new_tokens, settings.overlong_buffer, settings.overlong_penalty
            )
        token_kl = kl_estimate(logprobs, ref_logprobs, "k1") * mask if self.kl_in_reward else None
        if settings.advantage in ("reinforce_pp", "reinforce_pp_group"):
            group = group_size if settings.advantage == "reinforce_pp_group" else None
            beta = settings.beta if token_kl is not None else 0.0
            token_kl = token_kl if token_kl is not None else torch.zeros_like(mask)
            reduce = self.context.engine.sum_across_processes
            advantages = reinforce_pp_advantages(rewards.to(mask.device), token_kl, mask, beta, group, reduce)
            return rewards, advantages
        sequence_rewards = rewards if token_kl is None else rewards - settings.beta * token_kl.sum(dim=1).cpu()
        if settings.advantage == "rloo":
            return rewards, rloo_advantages(sequence_rewards, group_size).to(mask.device)
        return rewards, group_advantages(sequence_rewards, group_size, settings.scale_rewards).to(mask.device)

    def update(self, rollout: Rollout, scored: ScoredBatch, step_seed: int) -> dict[str, float]:
        context, settings, engine = self.context, self.settings, self.context.engine
        group_size = context.config.rollout.samples_per_prompt
        ref_logprobs = context.reference_logprobs(rollout)
        if self.on_policy:  # filled in by the loss's own forward pass: no separate pass needed
            logprobs, entropy = torch.zeros_like(ref_logprobs), torch.zeros_like(ref_logprobs)
            self.seen_logprobs, self.seen_entropy = logprobs, entropy
        else:
            with torch.no_grad(), engine.whole_weights():
                logprobs, entropy = context.logprobs(context.policy, rollout, with_entropy=True)
        mask = training_mask(rollout, scored)
        if settings.drop_truncated:  # DAPO's overlong filtering: a cut-off answer's reward says little
            mask = mask * rollout.ended[:, None].to(mask)
        correction_metrics, correction_weights, mask = self.correct_for_the_sampler(rollout, logprobs, mask)
        rewards, advantages = self.advantages(rollout, scored, logprobs, ref_logprobs, mask)
        # Every process holds the same number of groups: the mean of their fractions is the batch's.
        flat_fraction = (
            float(engine.sum_across_processes(torch.tensor([zero_variance_fraction(rewards, group_size)]))[0])
            / engine.num_processes
        )
        if settings.dynamic_sampling:  # DAPO: flat groups leave the update and its token counts
            mask = mask * spread_groups(rewards, group_size).repeat_interleave(group_size)[:, None].to(mask)
        else:
            message = describe_flat_groups(flat_fraction, rewards, group_size, context.config.rollout.max_new_tokens)
            if message:
                warn(f"step {engine.progress.step + 1}: {message}")
        targets = (
            {"advantages": advantages, "mask": mask}
            if self.on_policy
            else {"old_logprobs": logprobs, "advantages": advantages, "mask": mask}
        )
        if settings.beta > 0 and not self.kl_in_reward:
            targets["ref_logprobs"] = ref_logprobs
        if correction_weights is not None:
            targets["correction"] = correction_weights
        if settings.dynamic_sampling and float(engine.sum_across_processes(mask.sum().reshape(1).cpu())[0]) == 0:
            engine.skip_updates(self.optimizer_steps_per_step)  # every group was flat: nothing to learn this step
            if self.on_policy:  # the loss's pass that would have measured them does not run
                with torch.no_grad(), engine.whole_weights():
                    logprobs, entropy = context.logprobs(context.policy, rollout, with_entropy=True)
            updates = {"skipped_update": 1.0}
        else:
            updates = run_updates(
                engine,
                rollout,
                targets,
                settings.epochs,
                settings.minibatch_size,
                settings.loss_aggregation,
                step_seed,
                self.loss,
                context.config.rollout.max_new_tokens,
            )
        summary = rollout_summary(rollout, scored, logprobs, ref_logprobs, entropy, gather=engine.gather)
        return {**summary, **updates, **correction_metrics, "zero_variance_groups": flat_fraction}

    def correct_for_the_sampler(
        self, rollout: Rollout, logprobs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[dict[str, float], torch.Tensor | None, torch.Tensor]:
        """rollout.correction: ({correction_fraction}, the weights on the policy term, the mask of
        tokens kept), or ({}, None, mask) when there is nothing to correct. A token the sampler gave
        no log-prob for (an EOS appended after a stop) counts as agreeing (weight 1). The sampler's
        KL to the trainer is in every rollout summary (`sampler_kl`)."""
        rollout_settings, reduce = self.context.config.rollout, self.context.engine.sum_across_processes
        if rollout_settings.correction == "none":
            return {}, None, mask
        sampler = rollout.sampler_logprobs.to(logprobs.device)
        sampler = torch.where(torch.isnan(sampler), logprobs, sampler)
        weights, kept = rollout_correction(
            logprobs, sampler, mask, rollout_settings.correction, rollout_settings.correction_cap
        )
        changed = (weights != torch.exp((logprobs - sampler) * mask)) | (kept != mask)  # truncated or dropped
        return {"correction_fraction": float(masked_mean(changed.float(), mask, reduce))}, weights, kept


def run(config: GRPOConfig, resume: bool = False) -> dict:
    return run_online(config, STAGE, GRPO, resume)
