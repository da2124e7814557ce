"""Causal language-modelling loss, computed in chunks of tokens.

A full float32 ``[tokens, vocab]`` logits tensor (49,152 columns for SmolLM2) dominates the
memory of small-model training. Here the logits of at most ``chunk_size`` target tokens exist at
once, and under autograd each chunk is recomputed in backward instead of being stored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 logits h · W^T for a stable log-softmax.

    Under bf16 autocast (train.mixed_precision) the product itself runs in the weights' dtype:
    bf16 logits of magnitude 16-32 lie 0.125 apart, an error every log-prob, ratio and KL would
    carry. Weights held in bf16 multiply in bf16 either way.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        with torch.autocast(hidden.device.type, enabled=False):
            return (hidden.to(weight.dtype) @ weight.T).float()
    return (hidden @ weight.T).float()


def _chunk_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head_logits(hidden, weight)
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed negative log-likelihood of the target tokens.

        L = Σ_{t : y_t ≠ -100}  [ logsumexp_v (h_t · w_v)  −  h_t · w_{y_t} ]

    Args:
        hidden: (N, H) final hidden states h_t (any leading dims are flattened).
        weight: (V, H) output-embedding matrix W (the LM head, no bias).
        targets: (N,) next-token ids y_t, already shifted; -100 marks positions without a loss.
        chunk_size: target tokens whose logits are materialised at once.

    Returns:
        A float32 scalar: the sum over target tokens (divide by their count for the mean).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]  # only target positions need logits
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, targets.numel(), chunk_size):
        chunk = (hidden[start : start + chunk_size], weight, targets[start : start + chunk_size])
        if needs_grad:
            total = total + checkpoint(_chunk_nll_sum, *chunk, use_reentrant=False)
        else:
            total = total + _chunk_nll_sum(*chunk)
    return total


def causal_lm_nll_sum_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Obviously-correct version of :func:`causal_lm_nll_sum`: all logits at once."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp(mean NLL per token); inf when there are no tokens or the mean overflows."""
    if num_tokens == 0:
        return math.inf
    mean = nll_sum / num_tokens
    return math.exp(mean) if mean < 700 else math.inf


def _chunk_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head_logits(hidden, weight)  # (n, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs_and_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(head_logits(hidden, weight), dim=-1)  # (n, V)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(1, targets[:, None]).squeeze(1), entropy.detach()


def _chunked(function, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> list:
    """function over chunks of the target positions (ignored positions dropped), recomputed in backward."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, targets.numel(), chunk_size):
        chunk = (hidden[start : start + chunk_size], weight, targets[start : start + chunk_size])
        pieces.append(checkpoint(function, *chunk, use_reentrant=False) if needs_grad else function(*chunk))
    return pieces


def target_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(y_t | h_t) = h_t · w_{y_t} − logsumexp_v(h_t · w_v) at every target position.

    Args:
        hidden: (N, H) hidden states (leading dims flattened); weight: (V, H); targets: (N,), -100 = none.

    Returns:
        (M,) float32 log-probs of the M positions whose target is not -100, in order. Logits exist
        for at most chunk_size positions at once and are recomputed in backward.
    """
    pieces = _chunked(_chunk_token_logprobs, hidden, weight, targets, chunk_size)
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def target_token_logprobs_and_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`target_token_logprobs` plus the entropy H_t = −Σ_v p_v log p_v of each position's
    distribution (detached: a diagnostic), both (M,)."""
    pieces = _chunked(_chunk_logprobs_and_entropy, hidden, weight, targets, chunk_size)
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def sequence_sums(values: torch.Tensor, sequence_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """(S,) sums of per-token values grouped by sequence: out[s] = Σ_{t : index_t = s} values_t."""
    return torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, sequence_index, values)
