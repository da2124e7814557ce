"""Packed forward passes: hidden states from the decoder, then log-probs, values, rewards or a loss.

Every pass of the stages that is not sampling lives here: the causal-LM loss and perplexity,
DPO's answer log-probs, the RL rollout's per-token log-probs (and TRPO's distributions and Fisher products),
the critic's values and a reward model's scores. Decoders that follow position ids run every
sequence packed into one row without padding; samples of one prompt (and a pair's answers)
share one copy of it where the attention allows.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlhfkit.attention import consecutive_runs, pack_shared_prefixes, packed_hidden_states, shares_prompts
from rlhfkit.data.batching import LMBatch, PairBatch
from rlhfkit.engine.threads import follow_free_cores
from rlhfkit.losses.lm import (
    IGNORE_INDEX,
    causal_lm_nll_sum,
    perplexity,
    sequence_sums,
    target_token_logprobs,
    target_token_logprobs_and_entropy,
)
from rlhfkit.losses.trpo import softmax_fisher_product
from rlhfkit.models import backbone_and_head, backbone_and_score_head, eval_mode, packs_by_position_ids
from rlhfkit.sampling import Rollout


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
            follow_free_cores()
            nll += lm_nll_sum(model, batch.to(device), chunk_size).item()
            tokens += batch.num_target_tokens
    return perplexity_from_sums(nll, tokens)


def answer_logps(model: torch.nn.Module, batch: PairBatch, chunk_size: int) -> torch.Tensor:
    """(2B,) log π(y|x) summed over answer tokens: B chosen answers, then B rejected."""
    decoder, head_weight = backbone_and_head(model)
    hidden = packed_hidden_states(decoder, batch.input_ids, batch.position_ids, batch.layout)[0]  # (T, H)
    token_logps = target_token_logprobs(hidden[batch.predictors], head_weight, batch.target_ids, chunk_size)  # (M,)
    return sequence_sums(token_logps, batch.sequence_index, 2 * batch.num_pairs)


def _sequence_inputs(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    # Response padding sits after every valid token, so causal attention never reads it.
    attention_mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.response_ids)], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _packed_sequence_inputs(
    rollout: Rollout, share_prompts: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list | None]:
    """Every prompt+response in one row without padding: (1, T) ids and positions, the (N, R)
    index of the position predicting each response token (-1 on response padding), and the
    shared-prompt layout for the attention (None when nothing is shared).

    With share_prompts, consecutive samples of one prompt store their common prefix (the prompt,
    and any identical first tokens of the answers) once, so it is run once per group, not per sample.
    """
    prompt_lengths = rollout.prompt_mask.sum(dim=1).tolist()
    response_lengths = rollout.response_mask.sum(dim=1).long().tolist()
    prompt_width, response_width = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    sequences = [
        torch.cat([rollout.prompt_ids[row, prompt_width - p :], rollout.response_ids[row, :r]])
        for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths))
    ]
    groups = (
        consecutive_runs(rollout.prompt_index.tolist()) if share_prompts else [[row] for row in range(rollout.size)]
    )
    pack = pack_shared_prefixes(sequences, groups)
    predictors = torch.full((rollout.size, response_width), -1, dtype=torch.long, device=pack.input_ids.device)
    for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        predictors[row, :r] = pack.predictors(row, p)  # the position before each response token
    return pack.input_ids, pack.position_ids, predictors, pack.layout


def response_hidden_states(decoder: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(N, R, H): the hidden state that predicts each response token (the state before it).

    Decoders whose attention follows position ids run all sequences packed in one row, with no
    padding (0 on response padding), and the samples of one prompt share one copy of it; others
    run the left/right-padded rows with a mask.
    """
    if packs_by_position_ids(decoder):
        input_ids, position_ids, predictors, layout = _packed_sequence_inputs(
            rollout, share_prompts=shares_prompts(decoder)
        )
        hidden = packed_hidden_states(decoder, input_ids, position_ids, layout)[0]
        gathered = hidden[predictors.clamp(min=0)]  # (N, R, H)
        return gathered * (predictors >= 0).unsqueeze(-1).to(gathered.dtype)
    input_ids, attention_mask, position_ids = _sequence_inputs(rollout)
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    prompt_width = rollout.prompt_ids.shape[1]
    return hidden[:, prompt_width - 1 : -1]


def response_logprobs(
    model: torch.nn.Module,
    rollout: Rollout,
    temperature: float,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token log π(y_t | x, y_<t) under softmax(logits / temperature), (N, R), 0 on padding.

    With with_entropy, also the (detached) entropy of each position's distribution, (N, R); with
    with_hidden, also the (detached) final hidden states at those positions, (N, R, H), e.g. as
    features for a value head.
    """
    decoder, head_weight = backbone_and_head(model)
    hidden = response_hidden_states(decoder, rollout)
    valid = rollout.response_mask.bool()
    targets = rollout.response_ids.masked_fill(~valid, IGNORE_INDEX)
    logprobs = torch.zeros(rollout.response_ids.shape, dtype=torch.float32, device=hidden.device)
    scaled = hidden / temperature  # (h·W)/T = (h/T)·W
    if with_entropy:
        values, entropy_values = target_token_logprobs_and_entropy(scaled, head_weight, targets, chunk_size)
        entropy = torch.zeros_like(logprobs)
        entropy[valid] = entropy_values
    else:
        values, entropy = target_token_logprobs(scaled, head_weight, targets, chunk_size), None
    logprobs = logprobs.masked_scatter(valid, values)
    if with_hidden:
        return logprobs, entropy, hidden.detach()
    return logprobs, entropy


def response_values(critic: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(N, R) the critic's value V(x, y_<t) before each response token, 0 on padding."""
    backbone, head = backbone_and_score_head(critic)
    values = head(response_hidden_states(backbone, rollout)).squeeze(-1).float()
    return values * rollout.response_mask


class _ResponseStates(torch.nn.Module):
    """The decoder as a module whose forward gives the hidden states / T at the M response
    positions, (M, H): softmax(them · W_headᵀ) is π(· | x, y_<t). A module, for `functional_call`."""

    def __init__(self, decoder: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.decoder, self.temperature = decoder, temperature

    def forward(self, rollout: Rollout) -> torch.Tensor:
        return response_hidden_states(self.decoder, rollout)[rollout.response_mask.bool()] / self.temperature


def scaled_response_hidden(policy: torch.nn.Module, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(M, H) hidden states / T at the M response positions: softmax(them · W_headᵀ) is π(· | x, y_<t)."""
    return _ResponseStates(backbone_and_head(policy)[0], temperature)(rollout)


def fisher_vector_product(
    policy: torch.nn.Module,
    rollout: Rollout,
    temperature: float,
    parameters: list[torch.nn.Parameter],
    vector: torch.Tensor,
    chunk_size: int = 1024,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i v over the rollout's M response positions, flattened like
    `parameters`: M times the Fisher of π_θ (the Hessian of the mean KL(π_θ ‖ π_θ') at θ' = θ)
    applied to v.

    J v comes from forward-mode differentiation (`torch.func.jvp`, on the math attention kernel,
    which has forward derivatives; nothing is kept), the logit-space product from
    `softmax_fisher_product` on at most chunk_size positions at a time, and Jᵀ(·) from one backward
    through `hidden` — the graph of `scaled_response_hidden` on this rollout, computed here when not
    given (pass it to reuse one forward across products). Memory: one training pass on the rollout.
    """
    decoder, head_weight = backbone_and_head(policy)
    if hidden is None:
        hidden = scaled_response_hidden(policy, rollout, temperature)
    tangent_by_id, offset = {}, 0
    for parameter in parameters:
        tangent_by_id[id(parameter)] = vector[offset : offset + parameter.numel()].view_as(parameter)
        offset += parameter.numel()
    states = _ResponseStates(decoder, temperature)
    moved = {name: p for name, p in states.named_parameters() if id(p) in tangent_by_id}
    primals = {name: p.detach() for name, p in moved.items()}
    tangents = {name: tangent_by_id[id(p)] for name, p in moved.items()}
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no forward derivative
        _, hidden_tangent = torch.func.jvp(
            lambda values: torch.func.functional_call(states, values, (rollout,)), (primals,), (tangents,)
        )
    head_tangent = tangent_by_id.get(id(head_weight))  # the head itself trains (full fine-tuning)
    hidden_gradient = torch.empty_like(hidden)
    head_gradient = torch.zeros_like(head_weight) if head_tangent is not None else None
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            states_chunk = hidden[start : start + chunk_size].detach()
            probs = torch.softmax((states_chunk @ head_weight.T).float(), dim=-1)
            logit_tangent = (hidden_tangent[start : start + chunk_size] @ head_weight.T).float()
            if head_tangent is not None:
                logit_tangent += (states_chunk @ head_tangent.T).float()
            curvature = softmax_fisher_product(probs, logit_tangent).to(hidden.dtype)
            hidden_gradient[start : start + chunk_size] = curvature @ head_weight
            if head_gradient is not None:
                head_gradient += curvature.T @ states_chunk
    outputs, output_gradients = [hidden], [hidden_gradient]
    if head_gradient is not None:
        outputs.append(head_weight)
        output_gradients.append(head_gradient)
    gradients = torch.autograd.grad(outputs, parameters, output_gradients, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gradients, parameters)])


def at_response_positions(values: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """(N, R): the (M,) values of the M response positions (in `scaled_response_hidden`'s order)
    put in place, 0 on padding."""
    valid = rollout.response_mask.bool()
    placed = torch.zeros(valid.shape, dtype=values.dtype, device=values.device)
    placed[valid] = values
    return placed


def reward_model_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) float32 scalar rewards of N right-padded rows."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def packed_reward_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    last_positions: torch.Tensor,
    shared_prompt_groups: list | None = None,
) -> torch.Tensor:
    """(S,) float32 rewards of S sequences packed into one row: the score head at each one's last token."""
    backbone, head = backbone_and_score_head(model)
    hidden = packed_hidden_states(backbone, input_ids, position_ids, shared_prompt_groups)
    return head(hidden[0, last_positions]).squeeze(-1).float()
