"""Batches without padding.

Pretraining cuts one token stream into fixed blocks, so every row is full. SFT, DPO and reward
batches pack the sequences of a micro-batch into one row, with position ids that restart at 0
for each sequence and no attention mask. The forward passes hand the sequence boundaries to the
attention (`rlhfkit.attention`), which attends within each sequence only, causally, at Σ L² cost;
an attention without that support (e.g. eager) builds the same block-diagonal mask from the
position ids. Either way no example attends to another and no compute is spent on padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from rlhfkit.data.formatting import TokenizedExample, TokenizedPair

IGNORE_INDEX = -100


@dataclass
class LMBatch:
    """A causal-LM micro-batch. Targets are already shifted: the loss at position t predicts targets[t]."""

    input_ids: torch.Tensor  # (B, T) token ids
    position_ids: torch.Tensor  # (B, T) positions, restarting at 0 for each packed example
    targets: torch.Tensor  # (B, T) id of token t+1 when it is a training target, else -100

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def loss_units(self) -> int:
        """The engine averages the loss over target tokens."""
        return self.num_target_tokens

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> LMBatch:
        return LMBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device))


def _pack(examples: Sequence[TokenizedExample]) -> tuple[LMBatch, torch.Tensor]:
    """The examples in one row, and (1, T) segment ids: the example index at each position."""
    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    for example in examples:
        ids = example.input_ids
        input_ids.extend(ids)
        position_ids.extend(range(len(ids)))
        # Position t predicts token t+1 of the same example, only where that token is a target.
        targets.extend(ids[t + 1] if example.loss_mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1))
        targets.append(IGNORE_INDEX)
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    segments = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor([len(e.input_ids) for e in examples]))
    return LMBatch(as_row(input_ids), as_row(position_ids), as_row(targets)), segments[None, :]


def pack_examples(examples: Sequence[TokenizedExample]) -> LMBatch:
    """Concatenate examples into one row; targets never cross an example boundary."""
    return _pack(examples)[0]


def _order(count: int, seed: int | None) -> list[int]:
    """Indices 0..count-1, shuffled when a seed is given."""
    order = list(range(count))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def packed_batches(examples: Sequence[TokenizedExample], batch_size: int, seed: int | None) -> list[LMBatch]:
    """Micro-batches of `batch_size` examples each, packed padding-free; shuffled when seed is given."""
    order = _order(len(examples), seed)
    return [pack_examples([examples[i] for i in order[start : start + batch_size]]) for start in range(0, len(order), batch_size)]


def corpus_blocks(stream: Sequence[int], block_size: int) -> torch.Tensor:
    """(N, block_size) blocks of the token stream; the incomplete tail is dropped."""
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def block_batches(blocks: torch.Tensor, batch_size: int, seed: int | None) -> list[LMBatch]:
    """Micro-batches of full blocks; every token but the last of a block is a target's predecessor."""
    order = torch.arange(len(blocks))
    if seed is not None:
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = blocks[order[start : start + batch_size]]  # (B, T)
        targets = torch.full_like(rows, IGNORE_INDEX)
        targets[:, :-1] = rows[:, 1:]
        positions = torch.arange(rows.shape[1]).expand_as(rows).contiguous()
        batches.append(LMBatch(rows, positions, targets))
    return batches


# ---- preference pairs ------------------------------------------------------------------


@dataclass
class RewardBatch:
    """Chosen then rejected sequences of B pairs for one reward-model forward: packed into one
    row (decoders; position_ids set) or one right-padded row per sequence (attention_mask set)."""

    input_ids: torch.Tensor  # (1, T) packed or (2B, T) padded; sequences 0..B-1 prompt+chosen, B..2B-1 prompt+rejected
    attention_mask: torch.Tensor | None  # (2B, T) 1 on real tokens: padded rows
    position_ids: torch.Tensor | None  # (1, T) restarting at 0 per sequence: packed
    last_positions: torch.Tensor | None  # (2B,) index in the packed row of each sequence's last token
    margins: torch.Tensor | None  # (B,) m, or None

    @property
    def num_pairs(self) -> int:
        return (self.input_ids.shape[0] if self.last_positions is None else self.last_positions.numel()) // 2

    @property
    def loss_units(self) -> int:
        return self.num_pairs

    def to(self, device: torch.device) -> RewardBatch:
        move = lambda tensor: None if tensor is None else tensor.to(device)  # noqa: E731
        return RewardBatch(*(move(getattr(self, name)) for name in ("input_ids", "attention_mask", "position_ids", "last_positions", "margins")))


def _margins(pairs: Sequence[TokenizedPair]) -> torch.Tensor | None:
    if all(pair.margin is None for pair in pairs):
        return None
    return torch.tensor([pair.margin or 0.0 for pair in pairs], dtype=torch.float32)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) input ids padded on the right with pad_id, and the (N, T) attention mask."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask


def reward_batches(
    pairs: Sequence[TokenizedPair], batch_size: int, pad_id: int, seed: int | None, wrap=lambda ids: ids, packed: bool = False,
) -> list[RewardBatch]:
    """Batches of `batch_size` pairs; `wrap` adds special tokens an encoder expects ([CLS] ... [SEP]).

    packed: one row as in :func:`pack_examples` (decoders, whose attention follows the position ids);
    otherwise one right-padded row per sequence (encoders).
    """
    order = _order(len(pairs), seed)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [pairs[i] for i in order[start : start + batch_size]]
        rows = [wrap(p.prompt_ids + p.chosen_ids) for p in chunk] + [wrap(p.prompt_ids + p.rejected_ids) for p in chunk]
        if packed:
            batch = pack_examples([TokenizedExample(row, [False] * len(row)) for row in rows])
            last = torch.tensor([len(row) for row in rows]).cumsum(0) - 1
            batches.append(RewardBatch(batch.input_ids, None, batch.position_ids, last, _margins(chunk)))
        else:
            batches.append(RewardBatch(*pad_right(rows, pad_id), None, None, _margins(chunk)))
    return batches


@dataclass
class PairBatch:
    """B pairs packed padding-free into one row: B prompt+chosen sequences, then B prompt+rejected."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T), restarting at 0 for each of the 2B sequences
    targets: torch.Tensor  # (1, T): next token where it is an answer token, else -100
    sequence_index: torch.Tensor  # (M,) sequence (0..2B-1) of each of the M target tokens, in row order
    answer_lengths: torch.Tensor  # (2B,) answer token counts |y|
    pair_ids: torch.Tensor  # (B,) indices of the pairs in the dataset (for precomputed reference log-probs)

    @property
    def num_pairs(self) -> int:
        return self.pair_ids.numel()

    @property
    def loss_units(self) -> int:
        return self.num_pairs

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(*(getattr(self, name).to(device) for name in (
            "input_ids", "position_ids", "targets", "sequence_index", "answer_lengths", "pair_ids")))


def pack_pairs(pairs: Sequence[TokenizedPair], pair_ids: Sequence[int]) -> PairBatch:
    """The 2B sequences packed into one row; only answer tokens are targets."""
    examples = [TokenizedExample(p.prompt_ids + p.chosen_ids, [False] * len(p.prompt_ids) + [True] * len(p.chosen_ids)) for p in pairs]
    examples += [TokenizedExample(p.prompt_ids + p.rejected_ids, [False] * len(p.prompt_ids) + [True] * len(p.rejected_ids)) for p in pairs]
    batch, segments = _pack(examples)
    lengths = [sum(example.loss_mask[1:]) for example in examples]
    sequence_index = segments[batch.targets != IGNORE_INDEX]  # in row order, as target log-probs come
    return PairBatch(batch.input_ids, batch.position_ids, batch.targets, sequence_index, torch.tensor(lengths), torch.tensor(list(pair_ids)))


def pair_batches(pairs: Sequence[TokenizedPair], batch_size: int, seed: int | None) -> list[PairBatch]:
    order = _order(len(pairs), seed)
    return [
        pack_pairs([pairs[i] for i in order[start : start + batch_size]], order[start : start + batch_size])
        for start in range(0, len(order), batch_size)
    ]
