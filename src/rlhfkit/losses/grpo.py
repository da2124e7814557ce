"""The policy objective of the critic-free RL family: GRPO (Shao et al. 2024) and its variants.

One per-token loss covers them all; which paper it reproduces is a matter of its arguments:

| arguments | objective | paper |
|---|---|---|
| level token, clip ε | ρ_t clipped to [1−ε, 1+ε] | GRPO (Shao et al. 2024), PPO's surrogate |
| clip_high > clip | ρ_t clipped to [1−ε_low, 1+ε_high] ("clip-higher") | DAPO (Yu et al. 2025) |
| level sequence | one ratio per completion, s_i = exp(mean_t log ρ_t), clipped | GSPO (Zheng et al. 2025) |
| level sequence_token | s_i's value with each token's own gradient | GSPO-token (Zheng et al. 2025) |
| level sequence_sum, aggregation sequence | exp(Σ_t log ρ_t), the completion's likelihood ratio, clipped | RLOO (as TRL's RLOOTrainer) |
| objective cispo | −sg(min(ρ_t, ε_max))·A·log π(y_t): clipped tokens keep their gradient | CISPO (MiniMax 2025) |

Advantages come from losses/advantages.py; how per-token losses are averaged (per token, per
sequence, or over a constant) is losses/ppo.py's aggregate_loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from rlhfkit.losses.ppo import KLEstimator, kl_estimate

ImportanceLevel = Literal["token", "sequence", "sequence_token", "sequence_sum"]
Objective = Literal["clipped", "cispo"]


def importance_log_weights(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: ImportanceLevel = "token"
) -> torch.Tensor:
    """log ρ per token (B, T) at the given level.

    token:           log ρ_t = log π(y_t) − log π_old(y_t)
    sequence:        log s_i = (1/|y_i|) Σ_t log ρ_t, the same for every token of completion i
    sequence_token:  log s_i,t = log π(y_t) − sg[log π(y_t)] + sg[log s_i]
                     (the value of log s_i; the gradient of log π(y_t), so a token-level advantage acts per token)
    sequence_sum:    log S_i = Σ_t log ρ_t, the whole completion's likelihood ratio (RLOO)
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    mask = mask.to(log_ratio.dtype)
    if level == "sequence_sum":
        return (log_ratio * mask).sum(dim=1, keepdim=True).expand_as(log_ratio)
    sequence = ((log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))[:, None]
    if level == "sequence":
        return sequence.expand_as(log_ratio)
    if level == "sequence_token":
        return logprobs - logprobs.detach() + sequence.detach()
    raise ValueError(f"unknown importance level {level!r} (token, sequence, sequence_token, sequence_sum)")


def grpo_per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    clip: float,
    beta: float,
    estimator: KLEstimator = "k3",
    clip_high: float | None = None,
    mask: torch.Tensor | None = None,
    level: ImportanceLevel = "token",
    objective: Objective = "clipped",
    max_weight: float = 5.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-token objective as a loss to minimise, with the KL term to the reference.

    clipped (GRPO, DAPO's clip-higher, GSPO):
        ℓ_t = max(−A·ρ_t, −A·clip(ρ_t, 1−ε_low, 1+ε_high))  +  β·k3_t
    cispo (CISPO, MiniMax 2025, with ScaleRL's ε_max = max_weight):
        ℓ_t = −sg[min(ρ_t, ε_max)] · A · log π(y_t)  +  β·k3_t
    with  k3_t = π_ref(y_t)/π(y_t) − log(π_ref(y_t)/π(y_t)) − 1,  ρ_t at `level` (importance_log_weights).

    Args:
        logprobs, old_logprobs: (B, T) log-probs of the sampled tokens now and when sampled.
        ref_logprobs: (B, T) under the reference, or None (no KL term).
        advantages: (B,) one per completion, or (B, T) one per token.
        clip: ε_low (and ε_high unless clip_high is given).
        mask: (B, T) response tokens; needed by the sequence levels.
        weights: (B, T) detached weights on the policy term (rollout_correction), or None.

    Returns:
        (per-token loss (B, T), indicator (B, T) of tokens whose ratio was clipped, per-token KL (B, T);
        zeros without a reference or with β = 0).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    if mask is None:
        if level != "token":
            raise ValueError(f"importance level {level!r} needs the response mask")
        mask = torch.ones_like(logprobs)
    high = clip if clip_high is None else clip_high
    ratio = torch.exp(importance_log_weights(logprobs, old_logprobs, mask, level))
    if objective == "clipped":
        unclipped = -advantages * ratio
        clipped_term = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
        policy_loss = torch.maximum(unclipped, clipped_term)
        clipped = (clipped_term > unclipped).float()
    elif objective == "cispo":
        weight = torch.clamp(ratio, max=max_weight).detach()
        policy_loss = -weight * advantages * logprobs
        clipped = ((ratio > max_weight) & (advantages > 0)).float()
    else:
        raise ValueError(f"unknown objective {objective!r} (clipped, cispo)")
    policy_loss = policy_loss.expand_as(logprobs)
    if weights is not None:
        policy_loss = policy_loss * weights
    if beta == 0 or ref_logprobs is None:
        return policy_loss, clipped.expand_as(logprobs), torch.zeros_like(policy_loss)
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    return policy_loss + beta * kl, clipped.expand_as(logprobs), kl


Correction = Literal["tis", "mask_token", "mask_sequence"]


def rollout_correction(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, mode: Correction, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights for a rollout sampled by another engine than the one that trains (vLLM, a quantized copy).

    With w_t = π_old(y_t) / π_sampler(y_t), the training policy's and the sampler's probability of
    each sampled token (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"):

        tis:            weight min(w_t, C)                     (truncated importance sampling)
        mask_token:     weight w_t, tokens with w_t ∉ [1/C, C] dropped
        mask_sequence:  weight min(w_t, C), completions whose exp(mean_t log w_t) ∉ [1/C, C] dropped

    Returns:
        (weights (B, T), detached: they multiply the per-token loss; the mask (B, T) of tokens kept).
    """
    log_w = (old_logprobs - sampler_logprobs).detach() * mask
    weights = torch.exp(log_w)
    low, high = -math.log(cap), math.log(cap)
    if mode == "tis":
        return torch.clamp(weights, max=cap), mask
    if mode == "mask_token":
        inside = (log_w >= low) & (log_w <= high)
        return weights * inside, mask * inside
    if mode == "mask_sequence":
        mean = log_w.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        inside = (mean >= low) & (mean <= high)
        return torch.clamp(weights, max=cap) * inside, mask * inside
    raise ValueError(f"unknown rollout correction {mode!r} (tis, mask_token, mask_sequence)")
