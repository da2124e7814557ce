"""Batches (almost) without padding.

Pretraining cuts one token stream into fixed blocks, so every row is full. SFT and DPO pack the
examples of a micro-batch into rows with position ids that restart at 0 for each example and no
attention mask: transformers then builds a block-diagonal causal mask (SDPA and eager), so no
example attends to another. Rows hold at most max(longest example, ROW_TOKENS) tokens: attention
over a row costs its length squared whatever the mask, so one long row of a whole micro-batch
would spend most of its attention FLOPs on masked-out pairs. Short rows are topped up with a
padding segment of its own (positions from 0, no targets) that no real token attends to.
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

    input_ids: torch.Tensor  # (R, T) token ids
    position_ids: torch.Tensor  # (R, T) positions, restarting at 0 for each packed example (and padding segment)
    targets: torch.Tensor  # (R, T) id of token t+1 when it is a training target, else -100

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


ROW_TOKENS = 512  # smallest row budget: rows shorter than this waste more on padding than they save
PAD_ID = 0  # any id: padding segments are never attended to by real tokens and have no targets


def _fill_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First fit in the given order: each example goes to the first row with room for it."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(row_tokens - length)
    return rows


def _pack(examples: Sequence[TokenizedExample]) -> tuple[LMBatch, torch.Tensor]:
    """The packed batch and (R, W) segment ids: the example index at each position, -1 on padding."""
    lengths = [len(example.input_ids) for example in examples]
    rows = _fill_rows(lengths, max([ROW_TOKENS, *lengths]))
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for row_index, row in enumerate(rows):
        offset = 0
        for example_index in row:
            example = examples[example_index]
            ids, n = example.input_ids, len(example.input_ids)
            span = slice(offset, offset + n)
            input_ids[row_index, span] = torch.tensor(ids)
            position_ids[row_index, span] = torch.arange(n)
            # Position t predicts token t+1 of the same example, only where that token is a target.
            targets[row_index, offset : offset + n - 1] = torch.tensor(
                [ids[t + 1] if example.loss_mask[t + 1] else IGNORE_INDEX for t in range(n - 1)], dtype=torch.long
            )
            segments[row_index, span] = example_index
            offset += n
        position_ids[row_index, offset:] = torch.arange(width - offset)  # the padding segment
    return LMBatch(input_ids, position_ids, targets), segments


def pack_examples(examples: Sequence[TokenizedExample]) -> LMBatch:
    """Pack examples into as few rows as fit (see the module docstring); targets never cross an example boundary."""
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
    """Chosen then rejected sequences of B pairs for one reward-model forward: packed into rows
    (decoders; position_ids set) or one right-padded row per sequence (attention_mask set)."""

    input_ids: torch.Tensor  # (R, T); sequences 0..B-1 are prompt+chosen, B..2B-1 prompt+rejected
    attention_mask: torch.Tensor | None  # (2B, T) 1 on real tokens: padded rows
    position_ids: torch.Tensor | None  # (R, T) restarting at 0 per sequence: packed rows
    last_positions: torch.Tensor | None  # (2B,) flat index (row * T + column) of each packed sequence's last token
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

    packed: rows as in :func:`pack_examples` (for decoders, whose mask follows the position ids);
    otherwise one right-padded row per sequence.
    """
    order = _order(len(pairs), seed)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [pairs[i] for i in order[start : start + batch_size]]
        rows = [wrap(p.prompt_ids + p.chosen_ids) for p in chunk] + [wrap(p.prompt_ids + p.rejected_ids) for p in chunk]
        if packed:
            batch, segments = _pack([TokenizedExample(row, [False] * len(row)) for row in rows])
            flat = segments.flatten()
            real = flat >= 0
            # the last position of each sequence: where its segment id occurs for the last time
            last = torch.zeros(len(rows), dtype=torch.long).scatter_reduce(0, flat[real], torch.arange(flat.numel())[real], "amax")
            batches.append(RewardBatch(batch.input_ids, None, batch.position_ids, last, _margins(chunk)))
        else:
            batches.append(RewardBatch(*pad_right(rows, pad_id), None, None, _margins(chunk)))
    return batches


@dataclass
class PairBatch:
    """B pairs packed into rows: sequences 0..B-1 are prompt+chosen, B..2B-1 prompt+rejected."""

    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T), restarting at 0 for each of the 2B sequences
    targets: torch.Tensor  # (R, T): next token where it is an answer token, else -100
    sequence_index: torch.Tensor  # (M,) sequence (0..2B-1) of each of the M target tokens, in row-major order
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
    """The 2B sequences packed into rows; only answer tokens are targets."""
    examples = [TokenizedExample(p.prompt_ids + p.chosen_ids, [False] * len(p.prompt_ids) + [True] * len(p.chosen_ids)) for p in pairs]
    examples += [TokenizedExample(p.prompt_ids + p.rejected_ids, [False] * len(p.prompt_ids) + [True] * len(p.rejected_ids)) for p in pairs]
    batch, segments = _pack(examples)
    lengths = [sum(example.loss_mask[1:]) for example in examples]
    sequence_index = segments[batch.targets != IGNORE_INDEX]  # row-major, the order target log-probs come in
    return PairBatch(batch.input_ids, batch.position_ids, batch.targets, sequence_index, torch.tensor(lengths), torch.tensor(list(pair_ids)))


def pair_batches(pairs: Sequence[TokenizedPair], batch_size: int, seed: int | None) -> list[PairBatch]:
    order = _order(len(pairs), seed)
    return [
        pack_pairs([pairs[i] for i in order[start : start + batch_size]], order[start : start + batch_size])
        for start in range(0, len(order), batch_size)
    ]
