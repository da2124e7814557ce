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
    orpo = "orpo"  # SFT plus an odds-ratio term, in one stage

    @property
    def reference_free(self) -> bool:
        return self in (DPOLoss.simpo, DPOLoss.orpo)


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


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation: log(−expm1(x)) near 0, log1p(−exp(x)) below −ln 2
    (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 2 and 4-7): the SFT loss on the chosen answer plus an odds-ratio
    term, reference-free, so SFT and preference alignment are one stage.

        ℓ(y) = log π(y|x) / |y|                       (mean log-prob per response token)
        log odds(y) = ℓ(y) − log(1 − exp ℓ(y))
        L = −ℓ(y_c)  −  λ · log σ(log odds(y_c) − log odds(y_r))

    λ is the paper's weight of the odds-ratio term (TRL's `beta`, 0.1 by default there and here).

    Args:
        chosen_logps, rejected_logps: (B,) log π(y|x) summed over response tokens.
        chosen_lengths, rejected_lengths: (B,) response token counts |y|.
    """
    # exp ℓ = 1 would make the odds infinite: a mean log-prob this close to 0 is already certain.
    chosen_mean = (chosen_logps / chosen_lengths.clamp(min=1)).clamp(max=-1e-6)
    rejected_mean = (rejected_logps / rejected_lengths.clamp(min=1)).clamp(max=-1e-6)
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -chosen_mean - lam * F.logsigmoid(log_odds)


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
    if loss_type is DPOLoss.orpo:
        return orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta)
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
    """DPO's implicit reward r = β (log π(y|x) − log π_ref(y|x)); without a reference (SimPO, ORPO)
    it is β/|y| · log π(y|x)."""
    if ref_logps is None:
        return beta * policy_logps / lengths.clamp(min=1)
    return (beta * (policy_logps - ref_logps)).detach()


def best_and_worst_of_groups(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online DPO's pairs: in each group of `group_size` samples of one prompt, the highest-
    rewarded sample is chosen and the lowest rejected (Guo et al. 2024, "Direct Language Model
    Alignment from Online AI Feedback", with two samples; Xiong et al. 2024, "Iterative Preference
    Learning from Human Feedback", best and worst of k). A group whose valid samples are fewer
    than two, or all equally rewarded, gives no pair. The first of equal maxima (minima) is taken.

    Args:
        rewards: (N,) rewards, N = groups × group_size, each group's samples consecutive.
        valid: (N,) bool, False for samples whose reward was left out.

    Returns:
        (P,) row indices of the chosen samples and (P,) of the rejected ones, in group order.
    """
    scores = rewards.reshape(-1, group_size).double()
    usable = valid.reshape(-1, group_size)
    best = torch.where(usable, scores, -torch.inf).argmax(dim=1)  # (G,)
    worst = torch.where(usable, scores, torch.inf).argmin(dim=1)
    rows = torch.arange(scores.shape[0])
    spread = scores[rows, best] > scores[rows, worst]  # also False when fewer than two are valid
    offsets = rows * group_size
    return (offsets + best)[spread], (offsets + worst)[spread]
