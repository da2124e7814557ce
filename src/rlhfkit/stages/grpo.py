"""`rlhfkit grpo`: group-relative policy optimisation (Shao et al. 2024), no critic.

Per RL step: G completions for each prompt; each completion's advantage is its reward relative
to its group; the clipped objective plus β·k3 KL to the reference is averaged per token (or per
sequence). Groups whose rewards are all equal carry no gradient; their fraction is logged every
step and a warning says when most of a batch has nothing to learn from.
"""

from __future__ import annotations

import torch

from rlhfkit.config import GRPOConfig
from rlhfkit.engine import LossOutput
from rlhfkit.losses.grpo import group_advantages, grpo_per_token_loss, zero_variance_fraction
from rlhfkit.losses.ppo import aggregate_loss
from rlhfkit.rewards import ScoredBatch, group_scores
from rlhfkit.sampling import Rollout
from rlhfkit.stages.online import (
    RLSetup,
    RolloutBatch,
    optimizer_steps_per_step,
    rollout_summary,
    run_online,
    run_updates,
    training_mask,
    warn,
)

STAGE = "grpo"


def describe_flat_groups(fraction: float, rewards: torch.Tensor, max_new_tokens: int) -> str | None:
    """A warning when most groups have one reward for every completion (no learning signal)."""
    if fraction < 0.5:
        return None
    if fraction == 1.0 and bool((rewards == rewards[0]).all()):
        what = f"every completion got the same reward ({float(rewards[0]):g})"
    else:
        what = f"{fraction:.0%} of groups have zero reward variance"
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
        # the whole batch in one step is truly on-policy.
        self.on_policy = self.settings.epochs == 1 and self.settings.minibatch_size in (None, self.batch_size)

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
        per_token, clipped, kl = grpo_per_token_loss(
            logprobs, old_logprobs, targets.get("ref_logprobs"), targets["advantages"], settings.clip, settings.beta
        )
        mask = targets["mask"]
        loss_sum, _ = aggregate_loss(per_token, mask, settings.loss_aggregation)
        return LossOutput(
            loss_sum,
            {
                "clip_fraction": float(aggregate_loss(clipped, mask, settings.loss_aggregation)[0]),
                "kl_term": float(aggregate_loss(kl.detach(), mask, settings.loss_aggregation)[0]),
            },
        )

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
        rewards = group_scores(scored, group_size)
        advantages = group_advantages(rewards, group_size, settings.scale_rewards).to(logprobs.device)
        # Every process holds the same number of groups: the mean of their fractions is the batch's.
        flat_fraction = (
            float(engine.sum_across_processes(torch.tensor([zero_variance_fraction(rewards, group_size)]))[0])
            / engine.num_processes
        )
        message = describe_flat_groups(flat_fraction, rewards, context.config.rollout.max_new_tokens)
        if message:
            warn(f"step {engine.progress.step + 1}: {message}")
        mask = training_mask(rollout, scored)
        targets = (
            {"advantages": advantages, "mask": mask}
            if self.on_policy
            else {"old_logprobs": logprobs, "advantages": advantages, "mask": mask}
        )
        if settings.beta > 0:
            targets["ref_logprobs"] = ref_logprobs

        updates = run_updates(
            engine,
            rollout,
            targets,
            settings.epochs,
            settings.minibatch_size,
            settings.loss_aggregation,
            step_seed,
            self.loss,
        )
        return {
            **rollout_summary(rollout, scored, logprobs, ref_logprobs, entropy, gather=engine.gather),
            **updates,
            "zero_variance_groups": flat_fraction,
        }


def run(config: GRPOConfig, resume: bool = False) -> dict:
    return run_online(config, STAGE, GRPO, resume)
