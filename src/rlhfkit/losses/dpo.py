"""Offline preference optimisation: DPO and its relatives, as pure functions of log-probs.

Every function takes sequence log-probs summed over response tokens, shape (B,), and returns
per-pair losses, shape (B,). ``DPOLoss`` names the variants; :func:`dpo_family_loss` is the
switch. The policy and reference log-probs come from the same tokens; the reference ones carry no
gradient.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class DPOLoss(str, Enum):
    sigmoid = "sigmoid"  # DPO, with optional label smoothing (conservative DPO)
    ipo = "ipo"
    simpo = "simpo"


def sigmoid_dpo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative-DPO label smoothing ε (Mitchell 2023).

        h = β · [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]
        L = −(1 − ε) · log σ(h) − ε · log σ(−h)

    ε is the assumed probability that a label is flipped; ε = 0 is plain DPO.

    Args:
        chosen_logratios: (B,) log π(y_c|x) − log π_ref(y_c|x).
        rejected_logratios: (B,) log π(y_r|x) − log π_ref(y_r|x).
    """
    h = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17), with log-ratios averaged per response token.

        h = ρ_c / |y_c| − ρ_r / |y_r|,   ρ = log π(y|x) − log π_ref(y|x)
        L = (h − 1 / (2β))²

    The per-token average follows TRL and the IPO authors' own runs; β is the paper's τ.

    Args:
        chosen_lengths, rejected_lengths: (B,) response token counts |y|.
    """
    h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin γ.

        L = −log σ( β/|y_c| · log π(y_c|x) − β/|y_r| · log π(y_r|x) − γ )

    Args:
        chosen_logps, rejected_logps: (B,) log π(y|x) summed over response tokens (no reference).
        gamma: the target reward margin γ (the paper's γ, not γ/β).
    """
    h = beta * (chosen_logps / chosen_lengths.clamp(min=1) - rejected_logps / rejected_lengths.clamp(min=1))
    return -F.logsigmoid(h - gamma)


def dpo_family_loss(
    loss_type: DPOLoss,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> torch.Tensor:
    """Per-pair loss of the chosen variant; all tensors are (B,)."""
    if loss_type is DPOLoss.simpo:
        return simpo_loss(
            policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta, simpo_gamma
        )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type is DPOLoss.ipo:
        return ipo_loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta)
    return sigmoid_dpo_loss(chosen_logratios, rejected_logratios, beta, label_smoothing)


def implicit_rewards(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, beta: float, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """DPO's implicit reward r = β (log π(y|x) − log π_ref(y|x)); SimPO's is β/|y| · log π(y|x)."""
    if ref_logps is None:
        return beta * policy_logps / lengths.clamp(min=1)
    return (beta * (policy_logps - ref_logps)).detach()
