"""Reward-model and DPO-family losses: hand-worked numbers, properties, and TRL on the same tensors."""

import collections
import math
import types

import pytest
import torch

from rlhfkit.losses.dpo import (
    DPOLoss,
    dpo_family_loss,
    implicit_rewards,
    ipo_loss,
    log1mexp,
    orpo_loss,
    sigmoid_dpo_loss,
    simpo_loss,
)
from rlhfkit.losses.lm import IGNORE_INDEX, sequence_sums, target_token_logprobs
from rlhfkit.losses.reward import binary_feedback_loss, bradley_terry_loss
from rlhfkit.metrics import ranking_auc


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_by_hand():
    # r_c = 2, r_r = 1: -log σ(1) = log(1 + e^-1) = 0.313262
    # with margin 0.5: -log σ(0.5) = 0.474077;  centring η=0.1 adds 0.1 * (2 + 1)^2 = 0.9
    chosen, rejected = torch.tensor([2.0]), torch.tensor([1.0])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, torch.tensor([0.5])).item() == pytest.approx(
        -math.log(sigmoid(0.5)), abs=1e-6
    )
    assert bradley_terry_loss(chosen, rejected, center_coef=0.1).item() == pytest.approx(0.313262 + 0.9, abs=1e-5)


def test_bradley_terry_falls_as_chosen_reward_rises_and_matches_trl_formula():
    rejected = torch.zeros(3)
    losses = bradley_terry_loss(torch.tensor([-1.0, 0.0, 1.0]), rejected)
    assert losses[0] > losses[1] > losses[2]
    assert losses[1].item() == pytest.approx(math.log(2))
    # TRL RewardTrainer: -logsigmoid(r_c - r_r - margin).mean() + coef * mean((r_c + r_r) ** 2)
    torch.manual_seed(0)
    rc, rr, m = torch.randn(8), torch.randn(8), torch.rand(8)
    trl = -torch.nn.functional.logsigmoid(rc - rr - m).mean() + 0.01 * torch.mean((rc + rr) ** 2)
    assert bradley_terry_loss(rc, rr, m, 0.01).mean().item() == pytest.approx(trl.item(), rel=1e-6)


def test_sigmoid_dpo_by_hand():
    # policy - ref: chosen +1, rejected -1; β = 0.5 -> h = 0.5 * 2 = 1
    # plain: -log σ(1) = 0.313262;  ε = 0.1: 0.9 * 0.313262 + 0.1 * -log σ(-1) = 0.281936 + 0.131326 = 0.413262
    chosen, rejected = torch.tensor([1.0]), torch.tensor([-1.0])
    assert sigmoid_dpo_loss(chosen, rejected, 0.5).item() == pytest.approx(0.313262, abs=1e-6)
    assert sigmoid_dpo_loss(chosen, rejected, 0.5, 0.1).item() == pytest.approx(0.413262, abs=1e-6)


def test_ipo_by_hand():
    # ρ_c = 6 over 3 tokens = 2/token, ρ_r = 2 over 4 tokens = 0.5/token -> h = 1.5; β = 0.5 -> target 1/(2β) = 1
    # L = (1.5 - 1)^2 = 0.25
    loss = ipo_loss(torch.tensor([6.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([4.0]), 0.5)
    assert loss.item() == pytest.approx(0.25)


def test_simpo_by_hand():
    # log π: chosen -3 over 3 tokens = -1/token, rejected -8 over 4 = -2/token; β = 2 -> 2 * 1 = 2; γ = 0.5
    # L = -log σ(2 - 0.5) = log(1 + e^-1.5) = 0.201413
    loss = simpo_loss(torch.tensor([-3.0]), torch.tensor([-8.0]), torch.tensor([3.0]), torch.tensor([4.0]), 2.0, 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)


def test_dpo_loss_falls_as_chosen_gains_probability():
    ref = torch.tensor([-10.0])
    values = [
        sigmoid_dpo_loss(torch.tensor([c]) - ref, torch.tensor([-10.0]) - ref, 0.1).item() for c in (-12.0, -10.0, -8.0)
    ]
    assert values[0] > values[1] > values[2]
    assert values[1] == pytest.approx(math.log(2))


def test_implicit_rewards_carry_no_gradient():
    policy = torch.tensor([-5.0], requires_grad=True)
    rewards = implicit_rewards(policy, torch.tensor([-6.0]), beta=0.1)
    assert rewards.item() == pytest.approx(0.1) and not rewards.requires_grad


def trl_dpo_loss(loss_type, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta):
    """TRL's DPOTrainer._compute_loss on the same sequence log-probs (the model is a stand-in)."""
    from trl import DPOTrainer

    pairs = policy_chosen.shape[0]
    width = int(max(chosen_len.max(), rejected_len.max())) + 1
    lengths = torch.cat([chosen_len, rejected_len]).long()
    totals = torch.cat([policy_chosen, policy_rejected])
    completion_mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    per_token = torch.zeros(2 * pairs, width - 1)
    for row in range(2 * pairs):
        n = int(lengths[row])
        completion_mask[row, width - n :] = 1
        per_token[row, width - 1 - n :] = totals[row] / n  # the sequence log-prob spread over its tokens
    zeros = torch.zeros(2 * pairs, width - 1)

    class StandIn:
        training = True

        def __call__(self, **kwargs):
            return types.SimpleNamespace(
                log_probs=per_token, entropy=zeros, mean_logits=zeros, log_sum_sq_probs=zeros, is_top1=zeros.bool()
            )

    model = StandIn()
    identity = lambda x: x  # noqa: E731
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * pairs, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, model, inputs, False)


@pytest.mark.parametrize("loss_type", [DPOLoss.sigmoid, DPOLoss.ipo])
def test_matches_trl_on_the_same_tensors(loss_type):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (torch.randn(6) * 4 - 20 for _ in range(4))
    chosen_len, rejected_len = torch.tensor([3.0, 5, 7, 2, 9, 4]), torch.tensor([4.0, 6, 1, 8, 3, 5])
    ours = dpo_family_loss(
        loss_type, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta=0.1
    )
    theirs = trl_dpo_loss(
        loss_type.value, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, 0.1
    )
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-5)


def test_token_logprobs_and_sequence_sums():
    torch.manual_seed(0)
    hidden = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    targets = torch.tensor([3, IGNORE_INDEX, 5, 9, IGNORE_INDEX, 1, 0])
    chunked = target_token_logprobs(hidden, weight, targets, chunk_size=2)
    full = (
        torch.log_softmax(hidden @ weight.T, dim=-1)[targets != IGNORE_INDEX]
        .gather(1, targets[targets != IGNORE_INDEX][:, None])
        .squeeze(1)
    )
    torch.testing.assert_close(chunked, full)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    (grad_full,) = torch.autograd.grad(full.sum(), hidden)
    torch.testing.assert_close(grad_chunked, grad_full)
    # 5 kept tokens belonging to sequences 0, 0, 1, 2, 2
    sums = sequence_sums(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([0, 0, 1, 2, 2]), 3)
    assert sums.tolist() == [3.0, 3.0, 9.0]


def test_orpo_by_hand():
    # ℓ_c = −2/4 = −0.5, ℓ_r = −6/3 = −2.
    # log odds = (−0.5 − (−2)) − (log(1 − e^−0.5) − log(1 − e^−2))
    #          = 1.5 − (log 0.393469 − log 0.864665) = 1.5 − (−0.932752 + 0.145413) = 2.287339
    # L = 0.5 − 0.1 · log σ(2.287339) = 0.5 + 0.1 · 0.096706 = 0.509671
    loss = orpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([4.0]), torch.tensor([3.0]), 0.1)
    assert loss.item() == pytest.approx(0.509671, abs=1e-6)
    # Nearly certain answers (mean log-prob → 0) stay finite.
    certain = orpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([2.0]), torch.tensor([2.0]), 0.1)
    assert torch.isfinite(certain).all()


def test_log1mexp_is_stable_on_both_branches():
    import math

    values = [-1e-6, -1e-3, -0.5, -0.7, -5.0, -40.0]
    exact = torch.tensor([math.log(-math.expm1(v)) for v in values])  # float64 arithmetic, then float32
    torch.testing.assert_close(log1mexp(torch.tensor(values)), exact, rtol=1e-5, atol=1e-12)
    assert torch.log(1 - torch.exp(torch.tensor(-1e-6))).item() != pytest.approx(
        exact[0].item(), rel=1e-4
    )  # naive: cancels


def test_orpo_matches_trl_on_the_same_tensors():
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    torch.manual_seed(0)
    chosen, rejected = torch.randn(6) * 3 - 12, torch.randn(6) * 3 - 15
    chosen_len, rejected_len = torch.tensor([3.0, 5, 7, 2, 9, 4]), torch.tensor([4.0, 6, 1, 8, 3, 5])
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    # TRL gives the odds-ratio term from mean log-probs; its NLL is the chosen tokens' mean cross-entropy.
    theirs_or, *_ = ORPOTrainer.odds_ratio_loss(trainer, chosen / chosen_len, rejected / rejected_len)
    ours = dpo_family_loss(DPOLoss.orpo, chosen, rejected, None, None, chosen_len, rejected_len, beta=0.1)
    nll = -(chosen / chosen_len)
    torch.testing.assert_close(ours, nll - theirs_or, rtol=1e-5, atol=1e-6)
    # With equal lengths a batch's token-mean NLL (TRL) equals the mean of per-pair means (here).
    same = torch.full((6,), 5.0)
    trl_loss = (
        -(chosen.sum() / same.sum()) - ORPOTrainer.odds_ratio_loss(trainer, chosen / same, rejected / same)[0].mean()
    )
    ours_same = dpo_family_loss(DPOLoss.orpo, chosen, rejected, None, None, same, same, beta=0.1).mean()
    assert ours_same.item() == pytest.approx(trl_loss.item(), rel=1e-5)


def test_binary_feedback_loss_by_hand():
    # 👍 with r = 2:   −log σ(2)    = 0.126928
    # 👎 with r = −0.5: −log σ(0.5)  = 0.474077  (a disliked answer scored below 0 is on the right side)
    # 👎 with r = 1:   −log σ(−1)   = 1.313262
    losses = binary_feedback_loss(torch.tensor([2.0, -0.5, 1.0]), torch.tensor([True, False, False]))
    torch.testing.assert_close(losses, torch.tensor([0.126928, 0.474077, 1.313262]), atol=1e-6, rtol=0)
    # It is binary cross-entropy on the logit r with target 1 for 👍.
    rewards, labels = torch.randn(16), torch.rand(16) > 0.5
    reference = torch.nn.functional.binary_cross_entropy_with_logits(rewards, labels.float(), reduction="none")
    torch.testing.assert_close(binary_feedback_loss(rewards, labels), reference)


def test_ranking_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.4, 0.1: of the 4 positive-negative pairs, (0.9, 0.4), (0.9, 0.1)
    # and (0.4, 0.1) are ordered right and (0.4, 0.4) is a tie counting half: 3.5 / 4
    assert ranking_auc([0.9, 0.4, 0.4, 0.1], [True, True, False, False]) == 0.875
    assert ranking_auc([1.0, 2.0], [True, False]) == 0.0 and math.isnan(ranking_auc([1.0], [True]))
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=generator).float().tolist()  # many ties
    labels = (torch.rand(40, generator=generator) > 0.4).tolist()
    pairs = [(p, n) for p, lp in zip(scores, labels) if lp for n, ln in zip(scores, labels) if not ln]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert ranking_auc(scores, labels) == pytest.approx(brute)


def test_best_and_worst_of_each_group_form_online_dpos_pairs():
    from rlhfkit.losses.dpo import best_and_worst_of_groups

    rewards = torch.tensor([0.2, 0.9, 0.5, 1.0, 1.0, 1.0, 3.0, -1.0, 7.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, True, True, True, True, True, True, True, False, True, False, False])
    chosen, rejected = best_and_worst_of_groups(rewards, valid, group_size=3)
    # group 0: best 0.9 (row 1), worst 0.2 (row 0); group 1: all 1.0, no pair;
    # group 2: 7.0 is invalid, so best 3.0 (row 6), worst −1.0 (row 7); group 3: one valid sample, no pair
    assert chosen.tolist() == [1, 6] and rejected.tolist() == [0, 7]
