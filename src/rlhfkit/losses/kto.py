"""Alignment from unpaired feedback: KTO, from answers labelled desirable (👍) or undesirable (👎).

Kahneman–Tversky Optimisation (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization", eq. 8). With the implicit reward r(x, y) = log π(y|x) − log π_ref(y|x),
a reference point z₀ — the policy's KL from the reference, estimated on answers that do not
belong to their prompts — and weights λ_D, λ_U:

    v(x, y) = λ_D σ(β (r(x, y) − z₀))   if y is desirable
              λ_U σ(β (z₀ − r(x, y)))   if y is undesirable
    L = E[λ_y − v(x, y)]

A desirable answer lowers the loss by rising above the reference point, an undesirable one by
falling below it; because z₀ rises with any drift from the reference, the policy cannot win by
raising (or lowering) every answer at once.
"""

from __future__ import annotations

import torch


def kto_reference_point(mismatched_logps: torch.Tensor, mismatched_ref_logps: torch.Tensor) -> torch.Tensor:
    """z₀ = max(0, mean_j [log π(y'_j|x_j) − log π_ref(y'_j|x_j)]), detached (the paper's
    biased KL estimate, §4.1: y'_j is an answer of another prompt in the same micro-batch, so the
    mean estimates KL(π ‖ π_ref) without sampling). No gradient flows through it.

    Args:
        mismatched_logps: (B,) log π(y'|x) summed over the answer's tokens.
        mismatched_ref_logps: (B,) log π_ref(y'|x), the same tokens.

    Returns:
        () the reference point.
    """
    return (mismatched_logps - mismatched_ref_logps).mean().clamp(min=0).detach()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-example KTO loss, λ_y − v(x, y) (module docstring; the paper's eq. 8).

        desirable:    λ_D (1 − σ(β (r − z₀)))
        undesirable:  λ_U (1 − σ(β (z₀ − r)))

    Averaging over the examples of a batch equals TRL's KTOTrainer loss (`loss_type: kto`).

    Args:
        logps: (B,) log π(y|x), summed over answer tokens.
        ref_logps: (B,) log π_ref(y|x), no gradient.
        desirable: (B,) bool, the label (True: 👍).
        reference_point: () z₀ from :func:`kto_reference_point`.
        beta: β > 0, the sharpness of the value function (0.1 in the paper and TRL).
        desirable_weight, undesirable_weight: λ_D, λ_U. The paper (§4.2) advises
            λ_D n_D / (λ_U n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples.

    Returns:
        (B,) losses.
    """
    margin = beta * (logps - ref_logps - reference_point)  # β (r − z₀)
    signed = torch.where(desirable, margin, -margin)
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(logps.dtype)
    return weights * (1 - torch.sigmoid(signed))
