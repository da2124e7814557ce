"""Batches without padding.

Pretraining cuts one token stream into fixed blocks, so every row is full. SFT, DPO and reward
batches pack the sequences of a micro-batch into one row, with position ids that restart at 0
for each sequence and no attention mask. The forward passes hand the sequence boundaries to the
attention (`rlhfkit.attention`), which attends within each sequence only, causally, at Σ L² cost;
an attention without that support (e.g. eager) builds the same block-diagonal mask from the
position ids. Either way no example attends to another and no compute is spent on padding.

Preference pairs can go further: a pair's chosen and rejected answers share their prompt, so
with `share_prompts` (for models running rlhfkit's attention, `attention.shares_prompts`) the row
holds [prompt, chosen, rejected] per pair, the prompt once, and each answer attends to the prompt
and to itself only — the same outputs as two separate sequences, for fewer tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhfkit.attention import pack_shared_prefixes
from rlhfkit.data.formatting import TokenizedExample, TokenizedFeedback, TokenizedPair

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


def pack_examples(examples: Sequence[TokenizedExample]) -> LMBatch:
    """Concatenate examples into one row; targets never cross an example boundary."""
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
    return LMBatch(as_row(input_ids), as_row(position_ids), as_row(targets))


def example_order(count: int, seed: int | None) -> list[int]:
    """Indices 0..count-1, shuffled when a seed is given."""
    order = list(range(count))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def packed_batches(examples: Sequence[TokenizedExample], batch_size: int, seed: int | None) -> list[LMBatch]:
    """Micro-batches of `batch_size` examples each, packed padding-free; shuffled when seed is given."""
    order = example_order(len(examples), seed)
    return [
        pack_examples([examples[i] for i in order[start : start + batch_size]])
        for start in range(0, len(order), batch_size)
    ]


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
    layout: list | None = None  # packed with shared prompts: the attention's groups (attention.pack_shared_prefixes)

    @property
    def num_pairs(self) -> int:
        return (self.input_ids.shape[0] if self.last_positions is None else self.last_positions.numel()) // 2

    @property
    def loss_units(self) -> int:
        return self.num_pairs

    def to(self, device: torch.device) -> RewardBatch:
        move = lambda tensor: None if tensor is None else tensor.to(device)  # noqa: E731
        moved = (
            move(getattr(self, name))
            for name in ("input_ids", "attention_mask", "position_ids", "last_positions", "margins")
        )
        return RewardBatch(*moved, self.layout)


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
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_id: int,
    seed: int | None,
    wrap=lambda ids: ids,
    packed: bool = False,
    share_prompts: bool = False,
) -> list[RewardBatch]:
    """Batches of `batch_size` pairs; `wrap` adds special tokens an encoder expects ([CLS] ... [SEP]).

    packed: one row as in :func:`pack_examples` (decoders, whose attention follows the position ids),
    with share_prompts each pair's prompt once (module docstring); otherwise one right-padded row per
    sequence (encoders).
    """
    order = example_order(len(pairs), seed)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [pairs[i] for i in order[start : start + batch_size]]
        rows = [wrap(p.prompt_ids + p.chosen_ids) for p in chunk] + [wrap(p.prompt_ids + p.rejected_ids) for p in chunk]
        groups = _pair_groups(len(chunk)) if share_prompts else None
        input_ids, attention_mask, position_ids, last, layout = _scored_rows(rows, pad_id, packed, groups)
        batches.append(RewardBatch(input_ids, attention_mask, position_ids, last, _margins(chunk), layout))
    return batches


def _scored_rows(rows: Sequence[Sequence[int]], pad_id: int, packed: bool, groups: list[list[int]] | None) -> tuple:
    """The sequences a reward model scores, as (input_ids, attention_mask, position_ids,
    last_positions, layout): packed into one row (decoders), sequences of a group sharing their
    common prompt when groups are given, or one right-padded row each (encoders)."""
    if packed and groups is not None:
        pack = pack_shared_prefixes([torch.tensor(row) for row in rows], groups)
        return pack.input_ids, None, pack.position_ids, pack.last_positions(), pack.layout
    if packed:
        batch = pack_examples([TokenizedExample(list(row), [False] * len(row)) for row in rows])
        return batch.input_ids, None, batch.position_ids, torch.tensor([len(row) for row in rows]).cumsum(0) - 1, None
    return (*pad_right(rows, pad_id), None, None, None)


@dataclass
class LabelledAnswersBatch:
    """N answers labelled 👍 / 👎 for a pointwise reward model, laid out as RewardBatch lays out
    its sequences: packed into one row (position_ids set) or right-padded rows (attention_mask set)."""

    input_ids: torch.Tensor  # (1, T) packed or (N, T) padded; sequence i is prompt_i + answer_i
    attention_mask: torch.Tensor | None  # (N, T): padded rows
    position_ids: torch.Tensor | None  # (1, T): packed
    last_positions: torch.Tensor | None  # (N,) each sequence's last token in the packed row
    labels: torch.Tensor  # (N,) bool, True: desirable
    layout: list | None = None  # always None: no prompts shared

    @property
    def loss_units(self) -> int:
        return self.labels.numel()

    def to(self, device: torch.device) -> LabelledAnswersBatch:
        move = lambda tensor: None if tensor is None else tensor.to(device)  # noqa: E731
        moved = (
            move(getattr(self, name))
            for name in ("input_ids", "attention_mask", "position_ids", "last_positions", "labels")
        )
        return LabelledAnswersBatch(*moved)


def labelled_answer_batches(
    examples: Sequence[TokenizedFeedback],
    batch_size: int,
    pad_id: int,
    seed: int | None,
    wrap=lambda ids: ids,
    packed: bool = False,
) -> list[LabelledAnswersBatch]:
    """Batches of `batch_size` labelled answers for a pointwise reward model (see reward_batches
    for `wrap` and `packed`)."""
    order = example_order(len(examples), seed)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        rows = [wrap(example.prompt_ids + example.completion_ids) for example in chunk]
        input_ids, attention_mask, position_ids, last, _ = _scored_rows(rows, pad_id, packed, None)
        labels = torch.tensor([example.label for example in chunk], dtype=torch.bool)
        batches.append(LabelledAnswersBatch(input_ids, attention_mask, position_ids, last, labels))
    return batches


def _pair_groups(pairs: int) -> list[list[int]]:
    """Sequences 0..B-1 are prompt+chosen, B..2B-1 prompt+rejected: pair i groups i and B+i."""
    return [[index, pairs + index] for index in range(pairs)]


@dataclass
class PairBatch:
    """B pairs packed padding-free into one row: B prompt+chosen sequences, then B prompt+rejected
    (or, with shared prompts, [prompt, chosen, rejected] per pair)."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T), each sequence's positions counted from 0 at its (shared) prompt
    predictors: torch.Tensor  # (M,) row position whose hidden state predicts each answer token, sequence by sequence
    target_ids: torch.Tensor  # (M,) those answer tokens
    sequence_index: torch.Tensor  # (M,) sequence (0..2B-1) of each of the M target tokens
    answer_lengths: torch.Tensor  # (2B,) answer token counts |y|
    pair_ids: torch.Tensor  # (B,) indices of the pairs in the dataset (for precomputed reference log-probs)
    layout: list | None = None  # shared prompts: the attention's groups; None = every sequence alone

    @property
    def num_pairs(self) -> int:
        return self.pair_ids.numel()

    @property
    def loss_units(self) -> int:
        return self.num_pairs

    def to(self, device: torch.device) -> PairBatch:
        moved = (
            getattr(self, name).to(device)
            for name in (
                "input_ids",
                "position_ids",
                "predictors",
                "target_ids",
                "sequence_index",
                "answer_lengths",
                "pair_ids",
            )
        )
        return PairBatch(*moved, self.layout)


def pack_pairs(pairs: Sequence[TokenizedPair], pair_ids: Sequence[int], share_prompts: bool = False) -> PairBatch:
    """The 2B sequences packed into one row (each pair's prompt once with share_prompts); only
    answer tokens are targets, each predicted from the position before it."""
    prompts = [p.prompt_ids for p in pairs] * 2
    sequences = [torch.tensor(p.prompt_ids + p.chosen_ids) for p in pairs] + [
        torch.tensor(p.prompt_ids + p.rejected_ids) for p in pairs
    ]
    groups = _pair_groups(len(pairs)) if share_prompts else [[index] for index in range(len(sequences))]
    pack = pack_shared_prefixes(sequences, groups)
    predictors, targets, lengths = [], [], []
    for number, (prompt, sequence) in enumerate(zip(prompts, sequences)):
        first = max(len(prompt), 1)  # a sequence's first token has no position before it
        predictors.append(pack.predictors(number, first))
        targets.append(sequence[first:])
        lengths.append(len(sequence) - first)
    sequence_index = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor(lengths))
    return PairBatch(
        pack.input_ids,
        pack.position_ids,
        torch.cat(predictors),
        torch.cat(targets),
        sequence_index,
        torch.tensor(lengths),
        torch.tensor(list(pair_ids)),
        pack.layout,
    )


def pair_batches(
    pairs: Sequence[TokenizedPair], batch_size: int, seed: int | None, share_prompts: bool = False
) -> list[PairBatch]:
    order = example_order(len(pairs), seed)
    return [
        pack_pairs(
            [pairs[i] for i in order[start : start + batch_size]], order[start : start + batch_size], share_prompts
        )
        for start in range(0, len(order), batch_size)
    ]


@dataclass
class FeedbackBatch:
    """B labelled answers for KTO, packed as B pairs (data/formatting.TokenizedPair) whose first
    answer is the labelled one, y_i, and whose second is y'_i, another example's answer given to
    prompt x_i — the mismatched pairs from which KTO estimates its KL reference point."""

    pairs: PairBatch  # pair i: [x_i, y_i] and [x_i, y'_i]; pair_ids are the examples' indices
    labels: torch.Tensor  # (B,) bool, True: desirable

    @property
    def num_examples(self) -> int:
        return self.labels.numel()

    @property
    def loss_units(self) -> int:
        return self.num_examples

    def to(self, device: torch.device) -> FeedbackBatch:
        return FeedbackBatch(self.pairs.to(device), self.labels.to(device))


def feedback_batches(
    examples: Sequence[TokenizedFeedback],
    batch_size: int,
    max_length: int,
    seed: int | None,
    share_prompts: bool = False,
) -> list[FeedbackBatch]:
    """Micro-batches of labelled answers (shuffled when seed is given), each example paired with a
    mismatched answer: the answers rotated by one within the micro-batch, (x_1, y_B), (x_2, y_1), …,
    (x_B, y_{B−1}), as TRL's KTOTrainer does. A micro-batch of one borrows the answer of the
    example before it in the order. A mismatched answer loses its end where it would not fit in
    max_length beside its prompt."""
    order = example_order(len(examples), seed)
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        lenders = indices[-1:] + indices[:-1] if len(indices) > 1 else [order[start - 1]]
        pairs = []
        for index, lender in zip(indices, lenders):
            example = examples[index]
            mismatched = examples[lender].completion_ids[: max(max_length - len(example.prompt_ids), 1)]
            pairs.append(TokenizedPair(example.prompt_ids, example.completion_ids, mismatched))
        labels = torch.tensor([examples[index].label for index in indices], dtype=torch.bool)
        batches.append(FeedbackBatch(pack_pairs(pairs, indices, share_prompts), labels))
    return batches
