"""PPO, GRPO and TRPO objectives against numbers worked by hand."""

import math

import pytest
import torch

from rlhfkit.losses.advantages import group_advantages, zero_variance_fraction
from rlhfkit.losses.grpo import grpo_per_token_loss
from rlhfkit.losses.masked import masked_mean, masked_whiten
from rlhfkit.losses.ppo import (
    adaptive_kl_coef,
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    generalized_advantages,
    kl_estimate,
    kl_shaped_rewards,
)
from rlhfkit.losses.trpo import (
    backtracking_line_search,
    categorical_kl,
    categorical_kl_from_states,
    conjugate_gradient,
    mean_categorical_kl,
    softmax_fisher_product,
    surrogate_objective,
    trust_region_step_size,
)


def test_gae_equals_a_hand_computation():
    # One sequence of 3 tokens (a 4th is padding). γ = 0.9, λ = 0.5.
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7]
    # δ2 = 1 + 0 − 0.7 = 0.3;  δ1 = 0 + 0.9·0.7 − 0.6 = 0.03;  δ0 = 0 + 0.9·0.6 − 0.5 = 0.04
    # A2 = 0.3;  A1 = 0.03 + 0.45·0.3 = 0.165;  A0 = 0.04 + 0.45·0.165 = 0.11425
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    assert advantages[0].tolist() == pytest.approx([0.11425, 0.165, 0.3, 0.0])
    assert returns[0].tolist() == pytest.approx([0.61425, 0.765, 1.0, 0.0])


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0]])
    advantages, _ = generalized_advantages(rewards, values, mask, 1.0, 1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1])
    assert torch.allclose(advantages, (to_go - values) * mask, atol=1e-6)


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    # β = 0.5; log π − log π_ref = [0.2, −0.4, 0.6] on 3 tokens of a 4-wide row; score 2.
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.2, -1.6, -1.6, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = kl_shaped_rewards(torch.tensor([2.0]), logprobs, ref, mask, kl_coef=0.5)
    assert kl[0].tolist() == pytest.approx([0.2, -0.4, 0.6, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.1, 0.2, 2.0 - 0.3, 0.0])


def test_kl_estimators():
    # log π = log 0.5, log π_ref = log 0.25: log r = log 0.5 = −0.693147, r = 0.5
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * 0.693147**2, abs=1e-6)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + 0.693147, abs=1e-6)
    torch.manual_seed(0)
    a, b = torch.randn(1000), torch.randn(1000)
    assert (kl_estimate(a, b, "k3") >= 0).all()
    assert kl_estimate(a, a, "k3").abs().max().item() == 0.0
    with pytest.raises(ValueError):
        kl_estimate(a, b, "k4")


def test_k3_is_an_unbiased_estimate_of_the_kl():
    # Sample from p = [0.7, 0.3]; q = [0.4, 0.6]. KL(p‖q) = 0.7 ln(0.7/0.4) + 0.3 ln(0.3/0.6) = 0.183787
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = kl_estimate(p[samples].log(), q[samples].log(), "k3").mean().item()
    assert estimate == pytest.approx(0.183787, abs=0.005)


def test_clipped_policy_loss_at_and_beyond_the_clip_boundary():
    clip = 0.2
    old = torch.zeros(4)
    # ratios 1.0, 1.2 (at the boundary), 1.5 (beyond), 0.5 (beyond, other side)
    new = torch.log(torch.tensor([1.0, 1.2, 1.5, 0.5]))
    positive = torch.ones(4)
    loss, clipped = clipped_policy_loss(new, old, positive, clip)
    # A > 0: min(ρA, clip(ρ)A) -> 1.0, 1.2, 1.2 (clipped), 0.5 (the unclipped is smaller, so no clip)
    assert (-loss).tolist() == pytest.approx([1.0, 1.2, 1.2, 0.5])
    assert clipped.tolist() == [0.0, 0.0, 1.0, 0.0]
    loss, clipped = clipped_policy_loss(new, old, -positive, clip)
    # A < 0: min(−ρ, −clip(ρ)) -> −1.0, −1.2, −1.5, −0.8 (clipped up to 0.8)
    assert (-loss).tolist() == pytest.approx([-1.0, -1.2, -1.5, -0.8])
    assert clipped.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_clipped_policy_loss_gradient_vanishes_beyond_the_boundary():
    new = torch.log(torch.tensor([1.5, 1.1])).requires_grad_()
    loss, _ = clipped_policy_loss(new, torch.zeros(2), torch.ones(2), 0.2)
    loss.sum().backward()
    assert new.grad[0].item() == 0.0 and new.grad[1].item() == pytest.approx(-1.1)


def test_clipped_value_loss():
    # old 1.0, clip 0.5, return 3.0. V = 2.0: clipped V = 1.5; max((2−3)², (1.5−3)²)/2 = 1.125
    # V = 1.2 (inside): both terms equal (1.2−3)² / 2 = 1.62
    values, old, returns = torch.tensor([2.0, 1.2]), torch.ones(2), torch.full((2,), 3.0)
    loss, clipped = clipped_value_loss(values, old, returns, 0.5)
    assert loss.tolist() == pytest.approx([1.125, 1.62])
    assert clipped.tolist() == [1.0, 0.0]


def test_adaptive_kl_controller():
    # KL 2x the target: error clipped to 0.2; β ← 0.1·(1 + 0.2·256/1000) = 0.10512
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 1000, 256) == pytest.approx(0.10512)
    # KL at 90% of the target: error −0.1: β ← 0.1·(1 − 0.1·0.256)
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 1000, 256) == pytest.approx(0.1 * (1 - 0.0256))


def test_whitening_and_explained_variance():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    # mean 2, population std sqrt(2/3)
    assert whitened[0].tolist() == pytest.approx([-1.224745, 0.0, 1.224745, 0.0], abs=1e-5)
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)


def test_loss_aggregation():
    per_token = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total, units = aggregate_loss(per_token, mask, "token")
    assert (total.item(), units) == (6.0, 3)  # mean 2 per token
    total, units = aggregate_loss(per_token, mask, "sequence")
    assert (total.item(), units) == (4.0, 2)  # (1+3)/2 + 2/1 = 4 over 2 sequences


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, sample std sqrt(1/3) = 0.57735 -> ±0.866025 (ε = 1e-4 shifts the 5th decimal)
    advantages = group_advantages(rewards, 4, eps=0.0)
    assert advantages[:4].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    assert advantages[4:].tolist() == [0.0] * 4  # a flat group teaches nothing
    assert group_advantages(rewards, 4, scale_by_std=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert zero_variance_fraction(rewards, 4) == 0.5
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_grpo_loss_by_hand():
    # ratio 1 (on-policy), A = 2: policy term −2; log π = log 0.5, log π_ref = log 0.25: k3 = 0.193147; β = 0.1
    logp = torch.tensor([[math.log(0.5)]])
    loss, clipped, kl = grpo_per_token_loss(logp, logp, torch.tensor([[math.log(0.25)]]), torch.tensor([2.0]), 0.2, 0.1)
    assert loss.item() == pytest.approx(-2.0 + 0.1 * 0.193147, abs=1e-6)
    assert kl.item() == pytest.approx(0.193147, abs=1e-6) and clipped.item() == 0.0
    loss_no_kl, _, kl_none = grpo_per_token_loss(logp, logp, None, torch.tensor([2.0]), 0.2, 0.0)
    assert loss_no_kl.item() == -2.0 and kl_none.item() == 0.0


def test_conjugate_gradient_solves_a_known_spd_system():
    # A = [[4, 1], [1, 3]], b = [1, 2]: x = A⁻¹b = [1/11, 7/11]
    matrix = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    result = conjugate_gradient(lambda v: matrix @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), iterations=10)
    assert result.solution.tolist() == pytest.approx([1 / 11, 7 / 11])
    assert result.iterations <= 2 and result.residual_norm < 1e-5
    torch.manual_seed(0)
    q = torch.randn(20, 20, dtype=torch.float64)
    spd = q @ q.T + 20 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, dtype=torch.float64)
    solved = conjugate_gradient(lambda v: spd @ v, b, iterations=50, tolerance=1e-24).solution
    assert torch.allclose(solved, torch.linalg.solve(spd, b), atol=1e-8)


def test_trust_region_step_size():
    # sᵀFs = 8, δ = 0.01: β = sqrt(0.02 / 8) = 0.05, so ½(βs)ᵀF(βs) = ½·0.0025·8 = δ
    step = torch.tensor([2.0, 0.0])
    assert trust_region_step_size(step, torch.tensor([4.0, 0.0]), 0.01) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        trust_region_step_size(step, torch.tensor([-1.0, 0.0]), 0.01)


def test_line_search_rejects_steps_beyond_the_trust_region():
    # KL grows with the square of the fraction: 0.04·α². δ = 0.01 -> α = 1 (0.04) and 0.5 (0.01) ... 0.5 is at δ: accepted.
    tried = []

    def evaluate(fraction):
        tried.append(fraction)
        return fraction * 1.0, 0.04 * fraction**2

    result = backtracking_line_search(evaluate, max_kl=0.01, expected_improvement=1.0)
    assert tried == [1.0, 0.5] and result.fraction == 0.5 and result.kl == pytest.approx(0.01)
    # Every step beyond δ -> rejected, θ kept.
    result = backtracking_line_search(lambda f: (f, 1.0), max_kl=0.01, expected_improvement=1.0, max_backtracks=4)
    assert result.fraction == 0.0 and result.tries == 4
    # Inside δ but the surrogate gets worse -> rejected.
    assert backtracking_line_search(lambda f: (-f, 0.0), 0.01, 1.0).fraction == 0.0


def test_surrogate_and_categorical_kl():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    mask = torch.tensor([[1.0, 0.0]])
    # ratio 1 at θ_old: L = mean advantage over masked tokens
    assert surrogate_objective(logp, logp, torch.tensor([[3.0, 100.0]]), mask).item() == pytest.approx(3.0)
    old = torch.log(torch.tensor([[0.7, 0.3]]))
    new = torch.log(torch.tensor([[0.4, 0.6]]))
    assert mean_categorical_kl(old, new, torch.ones(1)).item() == pytest.approx(0.183787, abs=1e-5)
    assert mean_categorical_kl(old, old, torch.ones(1)).item() == 0.0


def test_softmax_fisher_product_is_the_kl_hessian_in_the_logits():
    # By hand: p = (½, ½), ż = (1, 0): ⟨p, ż⟩ = ½, p ⊙ (ż − ½) = (¼, −¼).
    product = softmax_fisher_product(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
    assert product.tolist() == pytest.approx([0.25, -0.25])
    # Against autograd: the Hessian of z ↦ KL(p ‖ softmax(z)) at softmax(z) = p, times ż.
    torch.manual_seed(0)
    logits, tangent = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    probs = torch.softmax(logits, -1)

    def kl(z):
        return categorical_kl(torch.log(probs), torch.log_softmax(z, -1))

    hessian = torch.autograd.functional.hessian(kl, logits)
    assert torch.allclose(softmax_fisher_product(probs, tangent), hessian @ tangent, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_categorical_kl_from_states_equals_the_full_distributions(chunk_size):
    torch.manual_seed(0)
    old_states, new_states = torch.randn(5, 3), torch.randn(5, 3)
    old_head, new_head = torch.randn(7, 3), torch.randn(7, 3)
    targets = torch.tensor([0, 6, 3, 3, 1])
    kl, logprobs = categorical_kl_from_states(old_states, old_head, new_states, new_head, targets, chunk_size)
    old = torch.log_softmax(old_states @ old_head.T, -1)
    new = torch.log_softmax(new_states @ new_head.T, -1)
    assert torch.allclose(kl, categorical_kl(old, new), atol=1e-6)
    assert torch.allclose(logprobs, new[torch.arange(5), targets])
    same, _ = categorical_kl_from_states(old_states, old_head, old_states, old_head, targets, chunk_size)
    assert same.abs().max() < 1e-6


def test_batch_statistics_sum_over_processes_through_reduce():

    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Two processes holding the same rows: every sum doubles, every mean and variance stays.
    twice = lambda sums: 2 * sums  # noqa: E731
    assert masked_mean(values, mask, twice) == pytest.approx(3.0)  # (1+2+3+4+5) / 5
    torch.testing.assert_close(masked_whiten(values, mask, reduce=twice), masked_whiten(values, mask))
    # A process whose rows sum to 10 over 2 tokens, beside one whose rows sum to 15 over 5: mean 25/7.
    other = torch.tensor([10.0, 2.0])
    assert masked_mean(values, mask, lambda sums: sums + other) == pytest.approx(25 / 7)
    returns = values + 1.0
    assert explained_variance(values, returns, mask, twice) == pytest.approx(explained_variance(values, returns, mask))
