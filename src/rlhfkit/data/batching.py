"""Batches without padding.

Pretraining cuts one token stream into fixed blocks, so every row is full. SFT packs the
examples of a micro-batch into one row with position ids that restart at 0 for each example and
no attention mask: transformers then builds a block-diagonal causal mask (SDPA and eager), so no
example attends to another and no compute is spent on padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from rlhfkit.data.formatting import TokenizedExample

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


def packed_batches(examples: Sequence[TokenizedExample], batch_size: int, seed: int | None) -> list[LMBatch]:
    """Micro-batches of `batch_size` examples each, packed padding-free; shuffled when seed is given."""
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
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
