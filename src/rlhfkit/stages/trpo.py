"""`rlhfkit trpo`: natural-gradient policy steps inside a KL trust region (Schulman et al. 2015).

Per RL step, over the trainable (LoRA) parameters θ:
1. advantages from the group baseline (reward minus the prompt's group mean, std-scaled) or from
   a critic with GAE;
2. g = ∇ of the surrogate mean_t[ρ_t·A_t] at θ_old (micro-batched, token-weighted);
3. F⁻¹g by conjugate gradient, where F·v is the product with the Hessian of the mean per-token
   KL(π_old ‖ π_θ) over the full vocabulary at the response positions of `fisher_samples`
   sequences — exactly the Gauss–Newton product Jᵀ(diag p − ppᵀ)J v at θ_old: forward-mode J v,
   the logit-space product, one backward — run `fisher_batch_size` sequences at a time, so its
   memory is that of a training pass on those sequences whatever `fisher_samples` is;
4. scale to the trust region, √(2δ / sᵀFs), and backtrack until the surrogate improves and the
   exact KL over every response position of the batch (`kl_check: batch`; or only the Fisher
   sequences' positions) is ≤ δ; otherwise keep θ_old. The Fisher sample only shapes the
   direction: a few sequences' curvature can miss directions that move the rest of the batch a
   lot, so the radius is enforced where the surrogate is measured.
With a value baseline, the critic then regresses on the returns with the engine's optimizer.

Under several processes each holds its share of the rollout (and of the Fisher sequences); g,
the Fisher-vector products, the surrogate and the KL are summed over processes, so every
process solves the same system and takes the same step.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from rlhfkit.config import TRPOConfig
from rlhfkit.engine import LossOutput, TrainingError
from rlhfkit.losses.advantages import group_advantages
from rlhfkit.losses.masked import masked_mean, masked_whiten
from rlhfkit.losses.ppo import (
    aggregate_loss,
    clipped_value_loss,
    explained_variance,
    generalized_advantages,
    kl_shaped_rewards,
)
from rlhfkit.losses.trpo import (
    backtracking_line_search,
    categorical_kl_from_states,
    conjugate_gradient,
    surrogate_objective,
    trust_region_step_size,
)
from rlhfkit.models import backbone_and_head
from rlhfkit.passes import at_response_positions, fisher_vector_product, response_values, scaled_response_hidden
from rlhfkit.rewards import ScoredBatch, group_scores
from rlhfkit.sampling import Rollout
from rlhfkit.stages.online import (
    RLSetup,
    RolloutBatch,
    micro_batch,
    optimizer_steps_per_step,
    run_online,
    run_updates,
)
from rlhfkit.stages.rl_measure import rollout_summary, training_mask

STAGE = "trpo"


class TRPO:
    def __init__(self, context: RLSetup) -> None:
        self.context, self.settings = context, context.config.trpo
        if self.settings.baseline == "group":
            self.optimizer_steps_per_step = 0
        else:
            context.build_critic(self.settings.critic_model)
            self.optimizer_steps_per_step = optimizer_steps_per_step(context.config, self.settings.value_epochs, None)
        self.parameters = [p for p in context.policy.parameters() if p.requires_grad]
        self.sum_over_processes = context.engine.sum_across_processes  # sums over processes

    def advantages(self, rollout: Rollout, scored: ScoredBatch, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = scored.scores.to(mask.device)
        if self.settings.baseline == "group":
            group_size = self.context.config.rollout.samples_per_prompt
            per_sequence = group_advantages(group_scores(scored, group_size), group_size).to(mask.device)
            return {"advantages": per_sequence[:, None] * mask}
        with torch.no_grad():
            values = response_values(self.context.critic, rollout)
        rewards, _ = kl_shaped_rewards(scores, torch.zeros_like(mask), torch.zeros_like(mask), mask, 0.0)
        advantages, returns = generalized_advantages(rewards, values, mask, self.settings.gamma, self.settings.lam)
        return {
            "advantages": masked_whiten(advantages, mask, reduce=self.sum_over_processes),
            "returns": returns,
            "old_values": values,
        }

    def micro_batches(self, rollout: Rollout, targets: dict[str, torch.Tensor]) -> list[RolloutBatch]:
        size = self.context.config.train.batch_size
        return [
            micro_batch(rollout, targets, torch.arange(start, min(start + size, rollout.size)), "token")
            for start in range(0, rollout.size, size)
        ]

    def surrogate_gradient(
        self, rollout: Rollout, targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g = ∇_θ L at θ_old, accumulated over micro-batches with every token weighted equally.

        At θ_old the ratio is 1 and π_old is the policy itself, so the same pass yields the
        behaviour log-probs (and entropies) the line search compares against.
        """
        total_tokens = float(self.sum_over_processes(targets["mask"].sum()))
        gradient = torch.zeros(sum(p.numel() for p in self.parameters), device=targets["mask"].device)
        logprobs_all = torch.zeros_like(targets["mask"])
        entropy_all = torch.zeros_like(targets["mask"])
        for batch in self.micro_batches(rollout, targets):
            logprobs, entropy = self.context.logprobs(self.context.policy, batch.rollout, with_entropy=True)
            logprobs_all[batch.rows, : batch.width] = logprobs.detach()
            entropy_all[batch.rows, : batch.width] = entropy
            rows = batch.tensors
            objective = (
                torch.exp(logprobs - logprobs.detach()) * rows["advantages"] * rows["mask"]
            ).sum() / total_tokens
            grads = torch.autograd.grad(objective, self.parameters, allow_unused=True)
            gradient += torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.parameters)]
            )
        return self.sum_over_processes(gradient), logprobs_all, entropy_all

    def natural_step(
        self, rollout: Rollout, targets: dict[str, torch.Tensor], gradient: torch.Tensor
    ) -> dict[str, float]:
        context, settings = self.context, self.settings
        old_logprobs = targets["old_logprobs"]
        surrogate_before = float(
            surrogate_objective(
                old_logprobs, old_logprobs, targets["advantages"], targets["mask"], self.sum_over_processes
            )
        )
        if not torch.isfinite(gradient).all():
            raise TrainingError(
                f"step {context.engine.progress.step + 1}: the surrogate gradient is not finite; stopping"
            )
        if float(gradient.norm()) == 0.0:
            return {"grad_norm": 0.0, "step_accepted": 0.0, "step_fraction": 0.0}
        share = max(1, settings.fisher_samples // context.engine.num_processes)  # this process's Fisher sequences
        fisher = micro_batch(rollout, targets, torch.arange(min(share, rollout.size)), "token")
        # The mean KL runs over every process's Fisher positions; each process sums its own.
        positions = float(self.sum_over_processes(fisher.rollout.response_mask.sum()))
        passes = [
            fisher.rollout.select(rows) for rows in torch.arange(fisher.rollout.size).split(settings.fisher_batch_size)
        ]
        # One pass holds all the Fisher sequences: its forward graph serves every product.
        kept = scaled_response_hidden(context.policy, passes[0], context.temperature) if len(passes) == 1 else None

        def fisher_vector(vector: torch.Tensor) -> torch.Tensor:
            product = sum(
                fisher_vector_product(context.policy, part, context.temperature, self.parameters, vector, hidden=kept)
                for part in passes
            )
            return self.sum_over_processes(product) / positions + settings.cg_damping * vector

        solved = conjugate_gradient(fisher_vector, gradient, settings.cg_iterations)
        curvature_direction = fisher_vector(solved.solution)
        kept = None  # frees the forward graph before the line search
        full_step = trust_region_step_size(solved.solution, curvature_direction, settings.max_kl) * solved.solution
        expected = float(gradient @ full_step)
        start = parameters_to_vector(self.parameters).detach()
        by_batch = settings.kl_check == "batch"
        checked = self.micro_batches(rollout, targets) if by_batch else [fisher]
        # π_old is kept as the states before the head (positions × hidden, not × vocabulary).
        head = backbone_and_head(context.policy)[1]
        old_head = head.detach().clone() if any(p is head for p in self.parameters) else head
        with torch.no_grad():
            checked_old = [
                scaled_response_hidden(context.policy, batch.rollout, context.temperature) for batch in checked
            ]

        @torch.no_grad()
        def try_fraction(fraction: float) -> tuple[float, float]:
            vector_to_parameters(start + fraction * full_step, self.parameters)
            # Checking the whole batch already computes every response position's distribution,
            # so the surrogate reads its sampled-token log-probs from it: one forward per try.
            logprobs = torch.zeros_like(targets["mask"]) if by_batch else context.logprobs(context.policy, rollout)[0]
            per_position = []
            for batch, old_states in zip(checked, checked_old):
                new_states = scaled_response_hidden(context.policy, batch.rollout, context.temperature)
                sampled = batch.rollout.response_ids[batch.rollout.response_mask.bool()]
                kl, sampled_logprobs = categorical_kl_from_states(old_states, old_head, new_states, head, sampled)
                per_position.append(kl)
                if by_batch:
                    logprobs[batch.rows, : batch.width] = at_response_positions(sampled_logprobs, batch.rollout)
            gain = float(
                surrogate_objective(
                    logprobs, targets["old_logprobs"], targets["advantages"], targets["mask"], self.sum_over_processes
                )
            )
            kl_per_position = torch.cat(per_position)
            kl = float(masked_mean(kl_per_position, torch.ones_like(kl_per_position), self.sum_over_processes))
            return gain - surrogate_before, kl

        search = backtracking_line_search(try_fraction, settings.max_kl, expected, settings.line_search_steps)
        with torch.no_grad():
            vector_to_parameters(start + search.fraction * full_step, self.parameters)
        return {
            "grad_norm": float(gradient.norm()),
            "cg_residual": solved.residual_norm,
            "cg_iterations": float(solved.iterations),
            "expected_improvement": expected,
            "surrogate_gain": search.improvement,
            "step_accepted": float(search.fraction > 0),
            "step_fraction": search.fraction,
            "line_search_kl": search.kl,
            "line_search_tries": float(search.tries),
        }

    def value_loss(self, module: torch.nn.Module, batch: RolloutBatch) -> LossOutput:
        values = response_values(module.critic, batch.rollout)
        unclipped = float("inf")  # plain regression: ½ (V − R)²
        per_token, _ = clipped_value_loss(values, batch.tensors["old_values"], batch.tensors["returns"], unclipped)
        loss_sum, _ = aggregate_loss(per_token, batch.tensors["mask"], "token")
        return LossOutput(loss_sum, {})

    def update(self, rollout: Rollout, scored: ScoredBatch, step_seed: int) -> dict[str, float]:
        context = self.context
        context.policy.eval()
        ref_logprobs = context.reference_logprobs(rollout)
        mask = training_mask(rollout, scored)
        targets = {"mask": mask, **self.advantages(rollout, scored, mask)}
        gradient, logprobs, entropy = self.surrogate_gradient(rollout, targets)
        targets["old_logprobs"] = logprobs
        step = self.natural_step(rollout, targets, gradient)
        summary = rollout_summary(rollout, scored, logprobs, ref_logprobs, entropy, gather=context.engine.gather)
        if self.settings.baseline == "value":
            critic_metrics = run_updates(
                context.engine, rollout, targets, self.settings.value_epochs, None, "token", step_seed, self.value_loss
            )
            step["value_loss"] = critic_metrics["loss"]
            step["explained_variance"] = explained_variance(
                targets["old_values"], targets["returns"], mask, reduce=self.sum_over_processes
            )
        return {**summary, **step}


def run(config: TRPOConfig, resume: bool = False) -> dict:
    return run_online(config, STAGE, TRPO, resume)
