"""`rlhfkit online_dpo`: DPO on pairs the policy itself samples, labelled by the reward each step.

Online DPO (Guo et al. 2024) and iterative DPO (Xiong et al. 2024): per RL step, the current
policy samples `rollout.samples_per_prompt` answers to each prompt; the reward (a reward model,
a classifier or a Python function — the judge) scores them; the best and worst answers of each
prompt become a (chosen, rejected) pair (`losses/dpo.best_and_worst_of_groups`; prompts whose
answers all score alike give none); and one optimizer step of the DPO (or IPO) loss is taken on
those pairs, against the reference policy (the starting model, adapters off). Offline DPO
learns from someone else's answers; here the pairs follow the policy as it changes.

Logged besides the RL stages' reward, KL and length: `pairs` (pairs formed), `reward_chosen`,
`reward_rejected` (the judge's mean score of each side), `accuracy` (share of pairs whose
implicit reward β·log π/π_ref already ranks the chosen answer higher: the policy agreeing with
the judge) and `margin` (mean implicit-reward difference), both before the step's update.
"""

from __future__ import annotations

import torch

from rlhfkit.config import OnlineDPOConfig
from rlhfkit.engine import LossOutput
from rlhfkit.losses.dpo import DPOLoss, best_and_worst_of_groups, dpo_family_loss
from rlhfkit.metrics import agreement
from rlhfkit.rewards import ScoredBatch
from rlhfkit.sampling import Rollout
from rlhfkit.stages.online import RLSetup, RolloutBatch, micro_batch, run_online
from rlhfkit.stages.rl_measure import rollout_summary, training_mask

STAGE = "online_dpo"


class OnlineDPO:
    optimizer_steps_per_step = 1

    def __init__(self, context: RLSetup) -> None:
        self.context, self.settings = context, context.config.online_dpo

    def loss(self, module: torch.nn.Module, batch: RolloutBatch) -> LossOutput:
        """DPO loss of the micro-batch's pairs: rows 2i (chosen) and 2i + 1 (rejected)."""
        targets = batch.tensors
        logprobs, _ = self.context.logprobs(module.policy, batch.rollout)
        mask = targets["mask"]
        logps, ref_logps, lengths = (logprobs * mask).sum(dim=1), targets["ref_logps"], mask.sum(dim=1)  # (b,)
        weight = targets["pair_weight"][0::2]  # (b/2,): 0 for a stand-in pair a process without pairs computes
        losses = dpo_family_loss(
            DPOLoss(self.settings.loss),
            logps[0::2],
            logps[1::2],
            ref_logps[0::2],
            ref_logps[1::2],
            lengths[0::2],
            lengths[1::2],
            self.settings.beta,
        )
        margin = self.settings.beta * ((logps[0::2] - ref_logps[0::2]) - (logps[1::2] - ref_logps[1::2])).detach()
        agrees = agreement(margin)
        return LossOutput(
            (losses * weight).sum(),
            {"accuracy": float((agrees * weight).sum()), "margin": float((margin * weight).sum())},
        )

    def update(self, rollout: Rollout, scored: ScoredBatch, step_seed: int) -> dict[str, float]:
        context, engine = self.context, self.context.engine
        ref_logprobs = context.reference_logprobs(rollout)
        with torch.no_grad(), engine.whole_weights():
            logprobs, entropy = context.logprobs(context.policy, rollout, with_entropy=True)
        mask = training_mask(rollout, scored)
        chosen, rejected = best_and_worst_of_groups(
            scored.scores, scored.valid, context.config.rollout.samples_per_prompt
        )
        targets = {
            "mask": mask,
            "ref_logps": (ref_logprobs * mask).sum(dim=1),
            "pair_weight": torch.ones(rollout.size, device=mask.device),
        }
        pairs = float(engine.sum_across_processes(torch.tensor([float(len(chosen))]))[0])
        sides = torch.stack([scored.scores[chosen].double().sum(), scored.scores[rejected].double().sum()])
        sides = engine.sum_across_processes(sides) / max(pairs, 1.0)
        if pairs == 0:  # every prompt's answers scored alike: nothing to prefer this step
            engine.skip_updates(1)
            updates = {"skipped_update": 1.0}
        else:
            updates = engine.optimizer_step(
                self.micro_batches(rollout, targets, chosen, rejected, step_seed), self.loss, already_split=True
            )
            updates.pop("units")
        summary = rollout_summary(rollout, scored, logprobs, ref_logprobs, entropy, gather=engine.gather)
        return {
            **summary,
            **updates,
            "pairs": pairs,
            "reward_chosen": float(sides[0]),
            "reward_rejected": float(sides[1]),
        }

    def micro_batches(
        self,
        rollout: Rollout,
        targets: dict[str, torch.Tensor],
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        step_seed: int,
    ) -> list[RolloutBatch]:
        """This process's pairs, shuffled, train.batch_size pairs per micro-batch, each pair's two
        rows adjacent. A process without pairs (others have some) computes one stand-in pair of
        weight 0, so it still joins the step's gradient all-reduce."""
        if len(chosen) == 0:
            chosen, rejected = torch.tensor([0]), torch.tensor([1])
            targets = {**targets, "pair_weight": torch.zeros_like(targets["pair_weight"])}
        order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(step_seed))
        size = self.context.config.train.batch_size
        batches = []
        for start in range(0, len(order), size):
            picked = order[start : start + size]
            rows = torch.stack([chosen[picked], rejected[picked]], dim=1).reshape(-1)  # c0, r0, c1, r1, ...
            batch = micro_batch(rollout, targets, rows, "sequence")
            batch.loss_units = int(targets["pair_weight"][rows[0::2]].sum())
            batches.append(batch)
        return batches


def run(config: OnlineDPOConfig, resume: bool = False) -> dict:
    return run_online(config, STAGE, OnlineDPO, resume)
