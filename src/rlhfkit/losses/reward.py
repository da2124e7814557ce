"""Reward-model objective: the Bradley–Terry pairwise loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margins: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley–Terry loss with an optional margin and reward-centring term.

        L_i = −log σ(r_c,i − r_r,i − m_i)  +  η · (r_c,i + r_r,i)²

    The first term is the negative log-likelihood of the human choice under the Bradley–Terry
    model P(c ≻ r) = σ(r_c − r_r) (Ouyang et al. 2022, InstructGPT, eq. 1). m_i is an optional
    per-pair margin (Llama 2, Touvron et al. 2023, eq. 2). The η term (Eisenstein et al. 2023,
    "Helping or Herding?") keeps rewards centred on zero, since the first term only sees
    differences. Averaging L_i over pairs equals TRL's RewardTrainer loss.

    Args:
        chosen_rewards: (B,) r_c, scalar rewards of the chosen responses.
        rejected_rewards: (B,) r_r, scalar rewards of the rejected responses.
        margins: (B,) m, or None for no margin.
        center_coef: η ≥ 0.

    Returns:
        (B,) per-pair losses (sum or average them as the caller needs).
    """
    difference = chosen_rewards - rejected_rewards
    if margins is not None:
        difference = difference - margins
    loss = -F.logsigmoid(difference)
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss


def binary_feedback_loss(rewards: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """Per-answer logistic loss of a pointwise reward model on 👍 / 👎 labels.

        L_i = −log σ(r_i)       if answer i is desirable (👍)
              −log σ(−r_i)      if it is undesirable (👎)

    The reward is the log-odds that a person likes the answer, P(👍 | x, y) = σ(r(x, y)) — a
    reward model that classifies answers as good or bad, by logistic regression on the labels —
    so r > 0 reads as liked. Its rewards are on an absolute scale, where Bradley–Terry rewards
    are comparable only between answers to the same prompt.

    Args:
        rewards: (N,) r, scalar rewards of the answers.
        desirable: (N,) bool labels.

    Returns:
        (N,) per-answer losses.
    """
    return -F.logsigmoid(torch.where(desirable, rewards, -rewards))
