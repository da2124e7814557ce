"""Advantages without a critic, from the rewards of sampled completions, and reward shaping.

Shapes: N completions = prompts × k, each prompt's k completions contiguous (a group); token-level
tensors are (N, T) over right-padded response positions with ``mask`` 1 on response tokens.
Statistics of the whole batch take ``reduce`` (losses/masked.py), which sums over the processes
holding its parts, so a batch split over processes is normalised as one.

| estimator | advantage of completion i (token t) | paper |
|---|---|---|
| group | (r_i − mean_g r) / (std_g r + ε), or without the std (Dr. GRPO) | Shao et al. 2024; Liu et al. 2025 |
| rloo | r_i − mean_{j≠i} r_j | Kool et al. 2019; Ahmadian et al. 2024 |
| reinforce_pp | whiten_batch(Σ_{t'≥t} r_t'), r_t = −β·KL_t + [t last]·r_i | Hu 2025 (REINFORCE++) |
| reinforce_pp_group | as reinforce_pp, with r_i − mean_g r as the sequence reward | Hu 2025 (REINFORCE++-baseline) |
"""

from __future__ import annotations

import torch

from rlhfkit.losses.masked import Reduce, masked_whiten, this_process_only


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Each completion's reward relative to the other completions of its prompt (GRPO).

        A_i = (r_i − mean_g(r)) / (std_g(r) + ε)     (std_g: sample std of group g)

    With scale_by_std=False, A_i = r_i − mean_g(r) (Dr. GRPO, Liu et al. 2025: dividing by the
    std over-weights groups that are nearly all right or all wrong).

    Args:
        rewards: (N,) rewards, N = prompts × group_size, each group contiguous.

    Returns:
        (N,) advantages; a group whose rewards are all equal gets 0 (nothing to learn from it).
    """
    grouped = _groups(rewards, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        scale = grouped.std(dim=1, keepdim=True) + eps
        advantages = torch.where(scale > 0, advantages / scale.clamp(min=1e-30), torch.zeros_like(advantages))
    return advantages.reshape(-1)


def zero_variance_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they contribute no policy gradient)."""
    grouped = _groups(rewards, group_size)
    return float((grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean())


def spread_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N / group_size,) bool: the groups whose rewards are not all equal (DAPO's dynamic sampling keeps these)."""
    grouped = _groups(rewards, group_size)
    return grouped.max(dim=1).values != grouped.min(dim=1).values


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each completion's reward minus the mean reward of the other k − 1 of its prompt.

        A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j = k/(k−1) · (r_i − mean_g(r))

    The baseline does not depend on r_i, so the policy gradient stays unbiased (Kool et al. 2019,
    "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024, "Back to Basics").

    Args:
        rewards: (N,) sequence rewards (with the KL penalty already in them when it is a reward).

    Returns:
        (N,) advantages.
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt (rollout.samples_per_prompt)")
    grouped = _groups(rewards, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def reinforce_pp_advantages(
    scores: torch.Tensor,
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    group_size: int | None = None,
    reduce: Reduce = this_process_only,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): token-level returns of KL-shaped rewards, normalised over the global batch.

        r_t = −β·KL_t + [t = last]·s_i          G_t = Σ_{t' ≥ t} r_t'   (γ = 1)
        A_t = (G_t − mean(G)) / std(G)          over every response token of the batch

    With group_size (REINFORCE++-baseline), s_i is first replaced by s_i − mean_g(s): the prompt's
    mean reward is the baseline, and the global normalisation still sets the scale.

    Args:
        scores: (N,) sequence rewards s_i; token_kl: (N, T) per-token KL estimates to the reference;
        mask: (N, T) response tokens.

    Returns:
        (N, T) advantages, 0 on padding.
    """
    if group_size is not None:
        grouped = _groups(scores, group_size)
        scores = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    mask = mask.to(token_kl.dtype)
    rewards = -kl_coef * token_kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype) * (mask.sum(dim=1) > 0)
    returns = rewards.flip(dims=[1]).cumsum(dim=1).flip(dims=[1]) * mask
    return masked_whiten(returns, mask, reduce=reduce)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward.

        R(L) = 0                              L ≤ L_max − L_cache
               ((L_max − L_cache) − L)/L_cache   L_max − L_cache < L ≤ L_max
               −1                             L > L_max

    L_max is the length budget (rollout.max_new_tokens) and L_cache the buffer before it in which
    the penalty grows linearly; `factor` scales it. Lengths never exceed L_max here (sampling
    stops there), so a completion cut at the budget gets −factor.

    Args:
        lengths: (N,) completion lengths in tokens.

    Returns:
        (N,) penalties (≤ 0).
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"the overlong buffer ({buffer}) must be in (0, max_new_tokens={max_new_tokens}]")
    start = max_new_tokens - buffer
    lengths = lengths.to(torch.float32)
    penalty = torch.clamp((start - lengths) / buffer, min=-1.0, max=0.0)
    return factor * penalty
