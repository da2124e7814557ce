"""Rollouts for online RL: batched sampling with the KV cache, and the log-probs of what was sampled.

Prompts are left-padded so every completion starts at the same column; completions are
right-padded after their first EOS. The response mask covers the generated tokens up to and
including that EOS, so the EOS itself is trained (a padding token equal to EOS never masks the
model's decision to stop). Log-probs for the behaviour policy, the loss and the KL all come from
:func:`response_logprobs` with the sampling temperature, so they agree exactly on the first pass.

Two engines sample: HF `generate` (CPU and GPU, the default) and, with `rollout.engine: vllm`,
a vLLM engine colocated on each process's GPU (`rlhfkit.vllm_rollout`); both hand their ids to
:func:`rollout_from_responses`, so masks and decoding are the same.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlhfkit.attention import consecutive_runs, pack_shared_prefixes, packed_hidden_states, shares_prompts
from rlhfkit.config import SamplingSettings
from rlhfkit.losses.lm import IGNORE_INDEX, target_token_logprobs, target_token_logprobs_and_entropy
from rlhfkit.models import (
    backbone_and_head,
    backbone_and_score_head,
    eval_mode,
    packs_by_position_ids,
    weights_are_sharded,
)


@dataclass
class Rollout:
    """N sampled completions; groups of `samples_per_prompt` for one prompt are contiguous."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 on prompt tokens
    response_ids: torch.Tensor  # (N, R) right-padded
    response_mask: torch.Tensor  # (N, R) float: 1 on generated tokens up to and including the first EOS
    ended: torch.Tensor  # (N,) bool: the completion emitted EOS within max_new_tokens
    prompt_index: torch.Tensor  # (N,) which prompt of the step each completion answers
    completions: list[str]  # decoded completions, special tokens removed

    @property
    def size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device) -> Rollout:
        return Rollout(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def select(self, indices: torch.Tensor) -> Rollout:
        """The completions at `indices`, as a smaller rollout."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = (
                [value[i] for i in indices.tolist()] if isinstance(value, list) else value[indices.to(value.device)]
            )
        return Rollout(**picked)


def _move(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def encode_prompts(tokenizer: Any, prompt_texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) left-padded ids and mask; a prompt over max_length tokens keeps its last max_length."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:] for text in prompt_texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in encoded], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded], dtype=torch.long)
    return ids, mask


def response_mask_from(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (N, R) float up to and including the first EOS, ended (N,) bool)."""
    is_eos = response_ids == eos_token_id
    ended = is_eos.any(dim=1)
    first_eos = torch.where(
        ended, is_eos.float().argmax(dim=1), torch.full_like(ended, response_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    return (positions[None, :] <= first_eos[:, None]).float(), ended


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, step, global sample index), well mixed."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowSeededSampler:
    """A logits processor that draws each row's next token with that row's own random generator.

    A completion then depends only on its prompt, the weights and its seed — not on which other
    rows share its batch, nor on which process generates it — so rollouts sharded across
    processes sample what one process would. The draw is an inverse-CDF lookup of one uniform
    number per row and step in softmax of the processed logits (temperature, then top-k, top-p);
    it hands generate a one-hot score row, and generate runs greedy.
    """

    def __init__(self, seeds: Sequence[int], settings: SamplingSettings) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.warpers = [TemperatureLogitsWarper(settings.temperature)]
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)
        # 1 - U(0, 1) lies in (0, 1], so a token of probability 0 is never drawn.
        uniform = torch.stack([1 - torch.rand((), generator=g) for g in self.generators]).to(cdf.device)
        tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp(max=cdf.shape[1] - 1)
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)


@torch.no_grad()
def sample_rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_texts: Sequence[str],
    settings: SamplingSettings,
    samples_per_prompt: int,
    max_prompt_length: int,
    seeds: Sequence[int] | None = None,
) -> Rollout:
    """Sample `samples_per_prompt` completions for each formatted prompt with the KV cache.

    With `seeds` (one per completion, prompt-major), each completion is drawn with its own
    generator (:class:`RowSeededSampler`); without, from torch's global generator.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    repeated = [text for text in prompt_texts for _ in range(samples_per_prompt)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, repeated, max_prompt_length)
    # A full config replaces the model's defaults (e.g. a top_k of 50 or a repetition penalty), so
    # the distribution sampled is exactly softmax(logits / temperature) restricted by top-p/top-k.
    # With seeds, RowSeededSampler applies temperature/top-k/top-p itself and generate decodes greedily.
    warping = (
        {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k or None}
        if seeds is None
        else {}
    )
    generation_config = GenerationConfig(
        do_sample=seeds is None,
        **warping,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with eval_mode(model):
        pieces = []
        for start in range(0, len(repeated), settings.batch_size):
            ids = prompt_ids[start : start + settings.batch_size].to(device)
            mask = prompt_mask[start : start + settings.batch_size].to(device)
            processors = LogitsProcessorList(
                [RowSeededSampler(seeds[start : start + settings.batch_size], settings)] if seeds is not None else []
            )
            prefix = shared_prompt_cache(model, ids, mask, torch.arange(start, start + len(ids)) // samples_per_prompt)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=generation_config,
                logits_processor=processors,
                past_key_values=prefix,
                synced_gpus=weights_are_sharded(model),
            )  # sharded: every process runs each decode step
            new = generated[:, ids.shape[1] :].cpu()
            pad = torch.full(
                (new.shape[0], settings.max_new_tokens - new.shape[1]), tokenizer.pad_token_id, dtype=torch.long
            )
            pieces.append(torch.cat([new, pad], dim=1))
    return rollout_from_responses(prompt_ids, prompt_mask, torch.cat(pieces), tokenizer, samples_per_prompt)


def shared_prompt_cache(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt_index: torch.Tensor
) -> Any | None:
    """The KV cache of every row's prompt but its last token, each distinct prompt run once.

    Rows answering one prompt (equal prompt_index) start from one copy of its cache, so with n
    samples per prompt generate's prefill does 1/n of the work; it then runs the last prompt
    token and decodes as usual. None when no prompt repeats (generate prefills itself).
    """
    runs = consecutive_runs(prompt_index.tolist())
    if len(runs) == len(ids) or ids.shape[1] < 2:
        return None
    first_rows = [run[0] for run in runs]
    prefix_ids, prefix_mask = ids[first_rows, :-1], mask[first_rows, :-1]
    positions = (prefix_mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = model(
        input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True
    ).past_key_values
    cache.reorder_cache(torch.tensor([number for number, run in enumerate(runs) for _ in run], device=ids.device))
    return cache


def pad_responses(rows: Sequence[Sequence[int]], pad_token_id: int, width: int) -> torch.Tensor:
    """(N, width) generated ids, right-padded (rows longer than width are cut)."""
    return torch.tensor(
        [list(row[:width]) + [pad_token_id] * (width - len(row[:width])) for row in rows], dtype=torch.long
    )


def rollout_from_responses(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    tokenizer: Any,
    samples_per_prompt: int,
) -> Rollout:
    """A rollout from left-padded prompts and right-padded generated ids (prompt-major groups),
    whichever engine sampled them: masks up to and including the first EOS, decoded completions."""
    response_mask, ended = response_mask_from(response_ids, tokenizer.eos_token_id)
    completions = [
        tokenizer.decode(row[: int(length)], skip_special_tokens=True).strip()
        for row, length in zip(response_ids, response_mask.sum(dim=1))
    ]
    prompt_index = torch.arange(response_ids.shape[0] // samples_per_prompt).repeat_interleave(samples_per_prompt)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended, prompt_index, completions)


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


class ValueHead(torch.nn.Module):
    """A linear value head V = w·h + b on frozen hidden states (of the reference policy).

    The cheap critic for CPUs: its features come from the reference pass the KL needs anyway, so
    the critic costs no forward or backward pass of its own. Starts at V = 0.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, directory, state_dict: dict[str, torch.Tensor] | None = None, **_) -> None:
        """state_dict: the whole tensors when the head's own are sharded (FSDP)."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        save_file(
            {name: value.detach().cpu().contiguous() for name, value in state.items()},
            str(directory / "value_head.safetensors"),
        )


def response_values(critic: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(N, R) the critic's value V(x, y_<t) before each response token, 0 on padding."""
    backbone, head = backbone_and_score_head(critic)
    values = head(response_hidden_states(backbone, rollout)).squeeze(-1).float()
    return values * rollout.response_mask
