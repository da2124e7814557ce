"""`rlhfkit ppo`: PPO with a critic, GAE and a per-token KL penalty to the reference policy.

Per RL step: sample completions, score them; with the rollout-time policy, reference and critic
compute log-probs and values; shape rewards as −β·KL per token plus the score at the last
token; GAE gives advantages and value targets; then several epochs of clipped policy and value
updates over shuffled minibatches. β is fixed or adapted towards a target KL.
"""

from __future__ import annotations

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.critic import ValueHead
from rlhfkit.engine import LossOutput
from rlhfkit.losses.masked import masked_whiten
from rlhfkit.losses.ppo import (
    adaptive_kl_coef,
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    generalized_advantages,
    kl_shaped_rewards,
)
from rlhfkit.passes import response_values
from rlhfkit.rewards import ScoredBatch
from rlhfkit.sampling import Rollout
from rlhfkit.stages.online import (
    RLSetup,
    RolloutBatch,
    optimizer_steps_per_step,
    run_online,
    run_updates,
)
from rlhfkit.stages.rl_measure import rollout_summary, training_mask

STAGE = "ppo"


class PPO:
    def __init__(self, context: RLSetup) -> None:
        self.context, self.settings = context, context.config.ppo
        if self.settings.critic == "head":
            context.critic = ValueHead(context.policy.config.hidden_size)
            context.critic_reference = context.config.model.name_or_path  # its features come from this model
        else:
            context.build_critic(self.settings.critic_model)
        self.optimizer_steps_per_step = optimizer_steps_per_step(
            context.config, self.settings.epochs, self.settings.minibatch_size
        )

    def values(self, critic: torch.nn.Module, rollout: Rollout, features: torch.Tensor | None) -> torch.Tensor:
        """(N, R) V(x, y_<t): from the value head on reference features, or the value model's own pass."""
        return critic(features) if features is not None else response_values(critic, rollout)

    def loss(self, module: torch.nn.Module, batch: RolloutBatch) -> LossOutput:
        settings, targets = self.settings, batch.tensors
        logprobs, _ = self.context.logprobs(module.policy, batch.rollout)
        mask = targets["mask"]
        values = self.values(module.critic, batch.rollout, targets.get("critic_features")) * mask
        policy_loss, clipped = clipped_policy_loss(
            logprobs, targets["old_logprobs"], targets["advantages"], settings.clip
        )
        value_loss, value_clipped = clipped_value_loss(
            values, targets["old_values"], targets["returns"], settings.value_clip
        )
        loss_sum, _ = aggregate_loss(policy_loss + settings.value_coef * value_loss, mask, "token")
        log_ratio = (logprobs - targets["old_logprobs"]).detach()
        return LossOutput(
            loss_sum,
            {
                "policy_loss": float((policy_loss.detach() * mask).sum()),
                "value_loss": float((value_loss.detach() * mask).sum()),
                "clip_fraction": float((clipped * mask).sum()),
                "value_clip_fraction": float((value_clipped * mask).sum()),
                "approx_kl": float((0.5 * log_ratio**2 * mask).sum()),  # KL(old ‖ new) of this pass, per token
            },
        )

    def update(self, rollout: Rollout, scored: ScoredBatch, step_seed: int) -> dict[str, float]:
        context, settings, engine = self.context, self.settings, self.context.engine
        head = settings.critic == "head"
        with torch.no_grad(), engine.whole_weights():
            logprobs, entropy = context.logprobs(context.policy, rollout, with_entropy=True)
            if head:
                ref_logprobs, features = context.reference_logprobs(rollout, with_hidden=True)
            else:
                ref_logprobs, features = context.reference_logprobs(rollout), None
            mask = training_mask(rollout, scored)
            with engine.autocast():  # the precision the critic trains in
                values = self.values(context.critic, rollout, features) * mask
        kl_coef = engine.extra_state.setdefault("kl_coef", settings.kl_coef)
        rewards, kl = kl_shaped_rewards(
            scored.scores.to(mask.device), logprobs, ref_logprobs, mask, kl_coef, settings.kl_estimator
        )
        advantages, returns = generalized_advantages(rewards, values, mask, settings.gamma, settings.lam)
        sum_over_processes = engine.sum_across_processes  # batch statistics over every process's completions
        if settings.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce=sum_over_processes)
        targets = {
            "old_logprobs": logprobs,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
            "mask": mask,
        }
        if head:
            targets["critic_features"] = features

        updates = run_updates(
            engine, rollout, targets, settings.epochs, settings.minibatch_size, "token", step_seed, self.loss
        )
        summary = rollout_summary(rollout, scored, logprobs, ref_logprobs, entropy, gather=engine.gather)
        penalty = scored.scores.to(rewards.device).sum() - rewards.sum()  # Σ β·KL over this process's completions
        totals = sum_over_processes(
            torch.stack([kl.sum(), penalty, torch.tensor(float(rollout.size), device=kl.device)]).float()
        ).tolist()
        sequence_kl, batch_size = totals[0] / totals[2], int(totals[2])
        if settings.target_kl is not None:
            engine.extra_state["kl_coef"] = adaptive_kl_coef(
                kl_coef, sequence_kl, settings.target_kl, settings.kl_horizon, batch_size
            )
        return {
            **summary,
            **updates,
            "kl_coef": kl_coef,
            "kl_penalty": totals[1] / totals[2],  # mean β·KL per sequence
            "explained_variance": explained_variance(values, returns, mask, reduce=sum_over_processes),
        }


def run(config: PPOConfig, resume: bool = False) -> dict:
    return run_online(config, STAGE, PPO, resume)
