"""PPO for RLHF: KL-shaped rewards, GAE, whitening, clipped policy and value losses, KL control.

Shapes: B sequences × T response positions; ``mask`` is 1 on response tokens (up to and including
EOS) and 0 on padding after them. Every function is pure; the stage composes them. Statistics
over a batch take an optional ``reduce`` that sums a tensor over the processes holding its parts
(data-parallel runs), so a mean or variance is the whole batch's (losses/masked.py). The choices
follow "The N Implementation Details of RLHF with PPO" (Huang et al. 2022) and Ziegler et al. 2019.
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhfkit.losses.masked import Reduce, masked_mean, this_process_only

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from tokens sampled from π (Schulman 2020, "Approximating KL").

    With log r = log π_ref(y) − log π(y):
        k1 = −log r                (unbiased, can be negative per token)
        k2 = ½ (log r)²            (biased, non-negative)
        k3 = (r − 1) − log r       (unbiased, non-negative, 0 when π = π_ref)
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = −β·KL_t, plus the sequence score s at the last response token.

        r_t = −β · k(log π(y_t), log π_ref(y_t))  +  [t = last] · s

    Args:
        scores: (B,) sequence rewards s; logprobs, ref_logprobs, mask: (B, T).

    Returns:
        (rewards (B, T), per-token KL estimates (B, T)); both 0 on padding.
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # responses are right-padded: the last valid index
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0]), last] += scores * (mask.sum(dim=1) > 0)
    return rewards, kl


def generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over right-padded response tokens.

        δ_t = r_t + γ·V_{t+1} − V_t          (V_{t+1} = 0 after the last response token)
        A_t = δ_t + γλ·A_{t+1}
        R_t = A_t + V_t                      (the value target)

    Returns:
        (advantages (B, T), returns (B, T)), 0 on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PPO clipped surrogate, per token (Schulman et al. 2017, eq. 7), as a loss to minimise.

        ρ_t = exp(log π(y_t) − log π_old(y_t))
        L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε))

    Returns:
        (per-token loss (B, T), per-token indicator that clipping was active (B, T)).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss, per token (as in OpenAI's PPO baselines and lm-human-preferences).

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L_t = ½ · max((V − R)², (V_clip − R)²)

    Returns:
        (per-token loss (B, T), per-token indicator that the clipped term was the larger (B, T)).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_error, clipped_error), (clipped_error > unclipped_error).float()


def adaptive_kl_coef(coef: float, observed_kl: float, target_kl: float, horizon: int, steps: int) -> float:
    """Ziegler et al. 2019's proportional controller for the KL coefficient β.

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n / horizon)

    where n is the number of samples (or steps) since the last update.
    """
    error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * steps / horizon)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce = this_process_only
) -> float:
    """1 − Var[R − V] / Var[R] over masked tokens: 1 is a perfect critic, ≤ 0 no better than a constant."""
    variance = masked_mean((returns - masked_mean(returns, mask, reduce)) ** 2, mask, reduce)
    residual = returns - values
    residual_variance = masked_mean((residual - masked_mean(residual, mask, reduce)) ** 2, mask, reduce)
    return float(1.0 - residual_variance / variance) if variance > 0 else float("nan")


LossAggregation = Literal["token", "sequence", "constant"]


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: LossAggregation = "token", max_length: int | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of a per-token loss and the number of units it averages over.

        token:    Σ_i Σ_t ℓ_it m_it            over Σ m tokens   (every token weighs the same;
                  DAPO's token-level loss)
        sequence: Σ_i (Σ_t ℓ_it m_it / Σ_t m_it)  over B sequences (every sequence weighs the same;
                  GRPO's original form, which favours long wrong answers less than short ones)
        constant: Σ_i Σ_t ℓ_it m_it            over B · max_length (Dr. GRPO, Liu et al. 2025: a
                  normaliser that depends on no length, so no length is favoured)

    The engine divides the sum by the units of the whole optimizer step, so accumulating
    micro-batches equals one big batch.
    """
    units = aggregation_units(mask, mode, max_length)
    if mode == "sequence":
        lengths = mask.sum(dim=1)
        has_tokens = lengths > 0
        return ((per_token * mask).sum(dim=1)[has_tokens] / lengths[has_tokens]).sum(), units
    return (per_token * mask).sum(), units


def aggregation_units(mask: torch.Tensor, mode: LossAggregation = "token", max_length: int | None = None) -> int:
    """What aggregate_loss averages over: tokens, non-empty sequences, or sequences × max_length."""
    sequences = int((mask.sum(dim=1) > 0).sum().item())
    if mode == "token":
        return int(mask.sum().item())
    if mode == "sequence":
        return sequences
    if mode == "constant":
        if max_length is None:
            raise ValueError("loss aggregation constant needs max_length (the completion length budget)")
        return sequences * max_length
    raise ValueError(f"unknown loss aggregation {mode!r} (token, sequence, constant)")
