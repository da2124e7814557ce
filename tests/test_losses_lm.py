import math

import pytest
import torch

from rlhfkit.losses.lm import IGNORE_INDEX, causal_lm_nll_sum, causal_lm_nll_sum_reference, perplexity


def test_hand_worked_two_tokens():
    # hidden h = [1, 0] and [0, 1]; W rows w_0=[1,0], w_1=[0,1], w_2=[0,0]  ->  logits = [1,0,0] and [0,1,0]
    # token 0: target 0 -> nll = log(e + 1 + 1) - 1 = log(4.71828) - 1 = 0.551445
    # token 1: target 2 -> nll = log(1 + e + 1) - 0 = 1.551445
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    targets = torch.tensor([0, 2])
    expected = (math.log(math.e + 2) - 1) + math.log(math.e + 2)
    assert causal_lm_nll_sum(hidden, weight, targets).item() == pytest.approx(expected, abs=1e-6)


def test_ignored_positions_add_nothing():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    only_first = causal_lm_nll_sum(hidden, weight, torch.tensor([0, IGNORE_INDEX]))
    assert only_first.item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    assert causal_lm_nll_sum(hidden, weight, torch.tensor([IGNORE_INDEX, IGNORE_INDEX])).item() == 0.0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_matches_reference_in_value_and_gradient(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)  # (B, T, H)
    weight = torch.randn(50, 16, requires_grad=True)  # (V, H)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :3] = IGNORE_INDEX  # a masked prompt
    targets[1, -1] = IGNORE_INDEX

    reference = causal_lm_nll_sum_reference(hidden, weight, targets)
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    chunked = causal_lm_nll_sum(hidden, weight, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad(chunked, (hidden, weight))

    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_loss_falls_as_target_logit_rises():
    hidden = torch.tensor([[1.0]])
    targets = torch.tensor([0])
    losses = [causal_lm_nll_sum(hidden, torch.tensor([[scale], [0.0]]), targets).item() for scale in (0.0, 1.0, 3.0)]
    assert losses[0] == pytest.approx(math.log(2))  # uniform over 2 tokens
    assert losses[0] > losses[1] > losses[2]


def test_perplexity():
    assert perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert perplexity(1.0, 0) == math.inf
    assert perplexity(1e6, 1) == math.inf
