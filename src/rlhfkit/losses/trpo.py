"""TRPO (Schulman et al. 2015): a natural-gradient step inside a KL trust region.

    maximise  L(θ) = E_t[ ρ_t(θ) · A_t ]    subject to   KL̄(π_old ‖ π_θ) ≤ δ

Linearising L and taking the quadratic (Fisher) approximation of the KL gives the step
    s = F⁻¹ g,   θ ← θ_old + α·√(2δ / sᵀFs)·s,   α ∈ {1, ½, ¼, …}
where g = ∇L, F is the Fisher matrix (the Hessian of the mean KL at θ_old), F⁻¹g is solved by
conjugate gradient with Fisher-vector products, and α is the largest fraction that improves L
while keeping the exact KL within δ.

For a softmax policy over logits z(θ) the Hessian of the mean KL at θ_old is exactly the
Gauss–Newton product (Martens 2010; Schraudolph 2002):
    F = (1/M) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i,   J_i = ∂z_i/∂θ,   p_i = softmax(z_i(θ_old))
(the term with the KL's gradient in z vanishes at θ_old), so F·v needs J v, the logit-space
product below, and one backward — no second-order derivatives of the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhfkit.losses.lm import head_logits
from rlhfkit.losses.masked import Reduce, masked_mean, this_process_only


def surrogate_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    reduce: Reduce = this_process_only,
) -> torch.Tensor:
    """L = mean over masked tokens of exp(log π − log π_old) · A  (to maximise; equals mean A at θ_old)."""
    return masked_mean(torch.exp(logprobs - old_logprobs) * advantages, mask, reduce)


def categorical_kl(old_logprobs: torch.Tensor, new_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(π_old ‖ π_new) = Σ_v π_old(v) (log π_old(v) − log π_new(v)) at each position: (..., V) → (...)."""
    return (old_logprobs.exp() * (old_logprobs - new_logprobs)).sum(dim=-1)


def categorical_kl_from_states(
    old_states: torch.Tensor,
    old_head: torch.Tensor,
    new_states: torch.Tensor,
    new_head: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(π_old ‖ π_new) at each position, and log π_new of each position's target token, where
    π = softmax(h Wᵀ): full-vocabulary distributions for at most chunk_size positions at a time.

    Args:
        old_states, new_states: (M, H) the states before the head (already divided by T);
        old_head, new_head: (V, H) the head weights; targets: (M,) token ids.

    Returns:
        (M,) KL and (M,) float32 target log-probs.
    """
    kl, target_logprobs = [], []
    for start in range(0, old_states.shape[0], chunk_size):
        old = torch.log_softmax(head_logits(old_states[start : start + chunk_size], old_head), dim=-1)
        new = torch.log_softmax(head_logits(new_states[start : start + chunk_size], new_head), dim=-1)
        kl.append(categorical_kl(old, new))
        target_logprobs.append(new.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1))
    if not kl:
        empty = old_states.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(kl), torch.cat(target_logprobs)


def mean_categorical_kl(
    old_logprobs: torch.Tensor, new_logprobs: torch.Tensor, mask: torch.Tensor, reduce: Reduce = this_process_only
) -> torch.Tensor:
    """KL̄ = mean over masked positions of Σ_v π_old(v) (log π_old(v) − log π_new(v)).

    Args:
        old_logprobs, new_logprobs: (..., V) full log-distributions at each position; mask: (...).
        reduce: sums over processes (see losses.ppo); for values only — it carries no gradient.
    """
    return masked_mean(categorical_kl(old_logprobs, new_logprobs), mask, reduce)


def softmax_fisher_product(probs: torch.Tensor, logit_tangent: torch.Tensor) -> torch.Tensor:
    """(diag p − p pᵀ)·ż at each position: the Hessian of KL(p ‖ softmax(z)) in z at softmax(z) = p
    times a logit direction ż, i.e. p ⊙ (ż − ⟨p, ż⟩).

    Args:
        probs: (..., V) the old distribution p; logit_tangent: (..., V) the direction ż.
    """
    return probs * (logit_tangent - (probs * logit_tangent).sum(dim=-1, keepdim=True))


@dataclass
class ConjugateGradientResult:
    solution: torch.Tensor
    residual_norm: float  # ‖b − A x‖ at the end
    iterations: int


def conjugate_gradient(
    matrix_vector: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iterations: int = 10,
    tolerance: float = 1e-10,
) -> ConjugateGradientResult:
    """Solve A x = b for symmetric positive-definite A given only x ↦ A x (Hestenes & Stiefel 1952).

        r₀ = p₀ = b, x₀ = 0
        α_k = rᵀr / pᵀAp;   x ← x + α p;   r' = r − α A p
        p ← r' + (r'ᵀr' / rᵀr) p

    Stops after `iterations` or once rᵀr < tolerance.
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual @ residual
    done = 0
    for done in range(1, iterations + 1):  # noqa: B007 (the count is returned)
        product = matrix_vector(direction)
        alpha = residual_sq / (direction @ product)
        x = x + alpha * direction
        residual = residual - alpha * product
        new_residual_sq = residual @ residual
        if new_residual_sq < tolerance:
            residual_sq = new_residual_sq
            break
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return ConjugateGradientResult(x, float(residual_sq.sqrt()), done)


def trust_region_step_size(step_direction: torch.Tensor, fisher_times_direction: torch.Tensor, max_kl: float) -> float:
    """The scale β = √(2δ / sᵀFs) that puts the quadratic KL model ½(βs)ᵀF(βs) exactly at δ."""
    curvature = float(step_direction @ fisher_times_direction)
    if curvature <= 0:
        raise ValueError(f"sᵀFs = {curvature} is not positive; the Fisher-vector products are not PSD")
    return (2.0 * max_kl / curvature) ** 0.5


@dataclass
class LineSearchResult:
    fraction: float  # α of the full step accepted; 0 when every candidate was rejected
    improvement: float  # L(θ_new) − L(θ_old) of the accepted step
    kl: float  # KL̄(π_old ‖ π_new) of the accepted step
    tries: int


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]],
    max_kl: float,
    expected_improvement: float,
    max_backtracks: int = 10,
    shrink: float = 0.5,
    accept_ratio: float = 0.1,
) -> LineSearchResult:
    """Try fractions 1, shrink, shrink², … of the full step; accept the first that
    (a) keeps KL̄ ≤ δ, (b) improves the surrogate, and (c) improves it by at least accept_ratio of
    the first-order prediction α·gᵀ(βs).

    Args:
        evaluate: α ↦ (L(θ_old + α·step) − L(θ_old), KL̄(π_old ‖ π_{θ_old + α·step})).
        expected_improvement: gᵀ(full step), the first-order predicted gain of α = 1.

    Returns:
        The accepted fraction, or fraction 0 (keep θ_old) when none qualifies.
    """
    fraction = 1.0
    for tries in range(1, max_backtracks + 1):
        improvement, kl = evaluate(fraction)
        enough = improvement > 0 and improvement >= accept_ratio * fraction * expected_improvement
        if kl <= max_kl and enough:
            return LineSearchResult(fraction, improvement, kl, tries)
        fraction *= shrink
    return LineSearchResult(0.0, 0.0, 0.0, max_backtracks)
