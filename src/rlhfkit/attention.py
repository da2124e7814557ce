"""Attention over packed sequences, one sequence at a time ("varlen" attention for SDPA).

Training batches pack several sequences into one row with no padding. Through a block-diagonal
mask, SDPA would still compute every (query, key) pair of the row — (Σ L)² work for Σ L² of use
— and cannot skip the causal half. Given the sequence boundaries (the `cu_seq_lens_q` keyword of
the flash-attention varlen convention, which transformers passes through to the attention
function), this attention runs SDPA with `is_causal=True` on each sequence's slice instead:
measured 6.6× faster than the masked row for 8 sequences of 140–510 tokens on a 2-core CPU,
with outputs equal to 5e-7. Without boundaries (generation, padded batches) it is plain SDPA.

On a GPU the per-sequence calls are kept on flash/memory-efficient attention, off cuDNN's, which
builds an execution plan per new shape (packed rows bring new lengths at every step). Before
this, and the sequence edges read once per forward rather than per layer, each SDPA call took
~3 ms on an H100's host and training steps were 5-6x slower (docs/benchmarks.md, "On a GPU").

Models load with this attention when `model.attn_implementation` is `sdpa` (the default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PACKED_SDPA = "rlhfkit_packed_sdpa"
# Every backend but cuDNN's, fastest first (see the module docstring).
SHAPE_AGNOSTIC_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (1, H, T, D), key/value (1, H_kv, T, D) of one packed row → output (1, T, H, D).

    The row's layout comes as sequence boundaries (`cu_seq_lens_q`: each sequence alone) or as
    `shared_prompt_groups` (per group a prefix, then members that each see it and themselves).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    groups = kwargs.get("shared_prompt_groups")
    boundaries = kwargs.get("cu_seq_lens_q")
    if (groups is None and boundaries is None) or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if groups is None:  # separate sequences given on the device only: one host sync per layer
        groups = separate_sequences(boundaries.tolist())
    repeats = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, repeats), repeat_kv(value, repeats)
    if not module.training:
        dropout = 0.0
    sdpa = torch.nn.functional.scaled_dot_product_attention
    pieces = []
    output_dtype = query.dtype
    # Under CPU bf16 autocast (train.mixed_precision) attention stays float32: the CPU's bf16
    # attention backward runs ~4x slower than float32's, and attention is a small part of the FLOPs.
    in_float32 = not query.is_cuda and torch.is_autocast_enabled("cpu")
    if in_float32:
        query, key, value = query.float(), key.float(), value.float()
    with (
        sdpa_kernel(SHAPE_AGNOSTIC_BACKENDS) if query.is_cuda else contextlib.nullcontext(),
        torch.autocast("cpu", enabled=False) if in_float32 else contextlib.nullcontext(),
    ):
        for prefix_start, prefix_end, members in groups:
            prefix, width = slice(prefix_start, prefix_end), prefix_end - prefix_start
            if width:
                pieces.append(
                    sdpa(
                        query[:, :, prefix],
                        key[:, :, prefix],
                        value[:, :, prefix],
                        dropout_p=dropout,
                        scale=scaling,
                        is_causal=True,
                    )
                )
            for start, end in members:
                own = slice(start, end)
                # rows: this member's tokens; columns: the prefix (all visible), then its own tokens (causal)
                visible = torch.ones(end - start, width + end - start, dtype=torch.bool, device=query.device).tril(
                    diagonal=width
                )
                keys = torch.cat([key[:, :, prefix], key[:, :, own]], dim=2)
                values = torch.cat([value[:, :, prefix], value[:, :, own]], dim=2)
                pieces.append(sdpa(query[:, :, own], keys, values, attn_mask=visible, dropout_p=dropout, scale=scaling))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous().to(output_dtype), None


def separate_sequences(edges: Sequence[int]) -> list[tuple[int, int, list]]:
    """Sequence edges [0, e1, ..., T] as the attention's layout: each sequence a prefix with no members."""
    return [(start, end, []) for start, end in zip(edges[:-1], edges[1:]) if end > start]


def register() -> str:
    """Make the packed attention (and SDPA's mask builder under its name) known to transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def sequence_boundaries(position_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Keywords telling the attention where each sequence of a packed row starts and ends.

    position_ids (1, T) restarting at 0 per sequence → cu_seq_lens_q/k (int32 [0, ..., T]) and
    max_length_q/k, the flash-attention varlen convention (also read by `flash_attention_2`), and
    the same edges as host integers (`shared_prompt_groups`, each sequence alone), read once here
    so that no layer waits on the GPU for them; other attentions ignore that keyword.
    Rows of a multi-row batch get no keywords (their mask comes from the position ids).
    """
    if position_ids.shape[0] != 1:
        return {}
    row = position_ids[0]
    starts = (row == 0).nonzero().flatten()
    edges = torch.cat([starts, torch.tensor([row.numel()], device=row.device)]).to(torch.int32)
    host_edges = edges.tolist()
    longest = max(end - start for start, end in zip(host_edges[:-1], host_edges[1:]))
    return {
        "cu_seq_lens_q": edges,
        "cu_seq_lens_k": edges,
        "max_length_q": longest,
        "max_length_k": longest,
        "shared_prompt_groups": separate_sequences(host_edges),
    }


def packed_hidden_states(
    backbone: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    shared_prompt_groups: list[tuple[int, int, list[tuple[int, int]]]] | None = None,
) -> torch.Tensor:
    """The backbone's last hidden states (R, T, H) for rows of packed sequences (no padding, no mask),
    with the sequence boundaries passed on to the attention.

    shared_prompt_groups: the row holds groups laid out as [prompt, response 1, ..., response G]
    (prompt_start, prompt_end, [(response_start, response_end), ...]); only for models loaded with
    this module's attention (see :func:`shares_prompts`).
    """
    layout = (
        sequence_boundaries(position_ids)
        if shared_prompt_groups is None
        else {"shared_prompt_groups": shared_prompt_groups}
    )
    return backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, **layout).last_hidden_state


@dataclass
class SharedPrefixPack:
    """Sequences packed into one row, the common prefix of each group stored once.

    input_ids, position_ids: (1, T); token_index[i]: where each token of sequence i sits in the
    row (its shared prefix and its own tokens); layout: for the attention, per group
    (prefix_start, prefix_end, [(own_start, own_end) per member]), or None when nothing is shared
    (position ids then restart at 0 per sequence, the plain packed row).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    token_index: list[torch.Tensor]
    layout: list[tuple[int, int, list[tuple[int, int]]]] | None

    def last_positions(self) -> torch.Tensor:
        """(S,) where each sequence's last token sits in the row (e.g. where a reward head reads)."""
        return torch.stack([index[-1] for index in self.token_index])

    def predictors(self, sequence: int, first: int) -> torch.Tensor:
        """Row positions whose hidden states predict tokens first, first+1, ... of a sequence
        (the position before each), for first ≥ 1."""
        return self.token_index[sequence][first - 1 : -1]


def consecutive_runs(keys: Sequence) -> list[list[int]]:
    """Indices grouped into runs of equal consecutive keys: [a, a, b, a] → [[0, 1], [2], [3]]."""
    runs: list[list[int]] = []
    for index, key in enumerate(keys):
        if runs and keys[runs[-1][0]] == key:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def pack_shared_prefixes(sequences: Sequence[torch.Tensor], groups: Sequence[Sequence[int]]) -> SharedPrefixPack:
    """Pack 1-D id tensors; each group's members (e.g. the samples of one prompt) share their
    longest common prefix, kept short of every member's last token so each has a token of its own.
    Every token sees what it would see in its sequence alone, so outputs equal separate runs
    (members of a group need not even share a prefix)."""
    pieces, positions, token_index, layout = [], [], [None] * len(sequences), []
    offset = 0
    for group in groups:
        members = [sequences[i] for i in group]
        shared = len(members[0])  # a group of one is all prefix
        if len(members) > 1:
            shortest = min(len(m) for m in members)
            same = torch.stack([m[:shortest] == members[0][:shortest] for m in members]).all(dim=0)
            shared = min(int(same.long().cumprod(0).sum()), shortest - 1)
        pieces.append(members[0][:shared])
        positions.append(torch.arange(shared))
        prefix_start, offset = offset, offset + shared
        owns = []
        for row, member in zip(group, members):
            own = member[shared:]
            token_index[row] = torch.cat(
                [torch.arange(prefix_start, prefix_start + shared), torch.arange(offset, offset + len(own))]
            )
            if len(own):
                pieces.append(own)
                positions.append(torch.arange(shared, len(member)))
                owns.append((offset, offset + len(own)))
                offset += len(own)
        layout.append((prefix_start, prefix_start + shared, owns))
    input_ids = torch.cat(pieces)[None, :]
    position_ids = torch.cat(positions)[None, :].to(input_ids.device)
    shares = any(len(group) > 1 for group in groups)
    return SharedPrefixPack(
        input_ids, position_ids, [i.to(input_ids.device) for i in token_index], layout if shares else None
    )


def shares_prompts(model: torch.nn.Module) -> bool:
    """Whether the model runs this module's attention, which understands shared-prompt groups
    (other kernels, e.g. flash-attention's varlen, would let siblings attend to each other)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == PACKED_SDPA
