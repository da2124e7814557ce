"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no critic."""

from __future__ import annotations

import torch

from rlhfkit.losses.ppo import KLEstimator, clipped_policy_loss, kl_estimate


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Each completion's reward relative to the other completions of its prompt.

        A_i = (r_i − mean_g(r)) / (std_g(r) + ε)     (std_g: sample std of group g)

    With scale_by_std=False, A_i = r_i − mean_g(r) (Dr. GRPO, Liu et al. 2025: dividing by the
    std over-weights groups that are nearly all right or all wrong).

    Args:
        rewards: (N,) rewards, N = prompts × group_size, each group contiguous.

    Returns:
        (N,) advantages; a group whose rewards are all equal gets 0 (nothing to learn from it).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        scale = grouped.std(dim=1, keepdim=True) + eps
        advantages = torch.where(scale > 0, advantages / scale.clamp(min=1e-30), torch.zeros_like(advantages))
    return advantages.reshape(-1)


def zero_variance_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they contribute no policy gradient)."""
    grouped = rewards.reshape(-1, group_size)
    return float((grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean())


def grpo_per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    clip: float,
    beta: float,
    estimator: KLEstimator = "k3",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's per-token objective as a loss to minimise.

        ℓ_t = max(−A·ρ_t, −A·clip(ρ_t, 1−ε, 1+ε))  +  β · k3_t
        k3_t = π_ref(y_t)/π(y_t) − log(π_ref(y_t)/π(y_t)) − 1

    The sequence advantage A (B,) is shared by every token of the completion; the KL term is a
    loss term (not a reward) as in the paper, and is skipped when β = 0.

    Returns:
        (per-token loss (B, T), clipping indicator (B, T), per-token KL (B, T); zeros without a reference).
    """
    policy_loss, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages[:, None], clip)
    if beta == 0 or ref_logprobs is None:
        return policy_loss, clipped, torch.zeros_like(policy_loss)
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    return policy_loss + beta * kl, clipped, kl
