"""Forward passes shared by stages: hidden states from the decoder, then a loss or log-probs from `losses/`."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rlhfkit.attention import packed_hidden_states
from rlhfkit.data.batching import LMBatch, PairBatch
from rlhfkit.losses.lm import causal_lm_nll_sum, perplexity, sequence_sums, target_token_logprobs
from rlhfkit.models import backbone_and_head, eval_mode


def lm_nll_sum(model: torch.nn.Module, batch: LMBatch, chunk_size: int) -> torch.Tensor:
    """Summed NLL of the batch's target tokens, without materialising full-vocabulary logits."""
    decoder, head_weight = backbone_and_head(model)
    # No attention mask: rows are never padded; packed examples attend only within themselves.
    hidden = packed_hidden_states(decoder, batch.input_ids, batch.position_ids)
    return causal_lm_nll_sum(hidden, head_weight, batch.targets, chunk_size)  # hidden: (B, T, H)


def perplexity_from_sums(nll: float, tokens: int) -> dict[str, float]:
    return {"loss": nll / max(tokens, 1), "perplexity": perplexity(nll, tokens), "tokens": tokens}


@torch.no_grad()  # not inference_mode: FSDP gathers weights into buffers it reuses in training
def evaluate_perplexity(
    model: torch.nn.Module, batches: Iterable[LMBatch], device: torch.device, chunk_size: int
) -> dict[str, float]:
    """Token-weighted mean NLL and perplexity over held-out batches."""
    nll, tokens = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            nll += lm_nll_sum(model, batch.to(device), chunk_size).item()
            tokens += batch.num_target_tokens
    return perplexity_from_sums(nll, tokens)


def answer_logps(model: torch.nn.Module, batch: PairBatch, chunk_size: int) -> torch.Tensor:
    """(2B,) log π(y|x) summed over answer tokens: B chosen answers, then B rejected."""
    decoder, head_weight = backbone_and_head(model)
    hidden = packed_hidden_states(decoder, batch.input_ids, batch.position_ids, batch.layout)[0]  # (T, H)
    token_logps = target_token_logprobs(hidden[batch.predictors], head_weight, batch.target_ids, chunk_size)  # (M,)
    return sequence_sums(token_logps, batch.sequence_index, 2 * batch.num_pairs)
